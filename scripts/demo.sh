#!/usr/bin/env bash
# Set up and run the main job: one MoE layer serving several LoRA adapters in
# one batch, checked against an fp32 reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" examples/moe_lora_demo.py "$@"
