"""Forcing a MoE LoRA kernel variant in a benchmark process (``benchmark_moe_lora.py --shrink-split-k N``)."""
from __future__ import annotations

import dataclasses


def force_shrink_split_k(n: int) -> None:
    """From now on every fused MoE LoRA op's config (``fused_moe_lora_w13`` / ``_w2``, tuned or heuristic)
    gets ``shrink_split_k = n``: the split-K variant on sorted routing (``moe_lora_split.py``), with its
    expand at the settings the static report favours: one N tile per program (at most 16 N-splits) and one
    stage.  The separate shrink / expand ops (the baseline) keep theirs.  For benchmarks only: it replaces
    ``moe_lora_config.get_moe_lora_config``, which the Punica wrapper looks up at each call."""
    from vllm.lora.ops.triton_ops import moe_lora_config as mc

    if n < 1:
        raise ValueError(f"--shrink-split-k must be >= 1, got {n}")
    real = getattr(mc.get_moe_lora_config, "__wrapped_config__", mc.get_moe_lora_config)

    def patched(op: str, **kw):
        cfg = real(op, **kw)
        if not op.startswith("fused_moe_lora"):
            return cfg
        n_tiles = -(-max(int(kw["N"]), 1) // cfg.block_size_n)
        return dataclasses.replace(cfg, shrink_split_k=n, num_n_splits=min(n_tiles, 16), num_stages=1)

    patched.__wrapped_config__ = real
    mc.get_moe_lora_config = patched
