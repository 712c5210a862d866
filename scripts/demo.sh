#!/usr/bin/env bash
# Set up and run the main job: LLM(enable_lora=True) on the embedded demo MoE
# model, one batch mixing the base model and two adapters (examples/lora_demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
exec "$PY" examples/lora_demo.py "$@"
