"""Forcing a MoE LoRA kernel variant in a benchmark process: ``benchmark_moe_lora.py --shrink-split-k N``
(``force_shrink_split_k``) and the module switches of the LoRA path choice and kernels (``SWITCHES``: one flag
each, ``add_switch_flags`` / ``apply_switch_flags``)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Optional


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


_LORA = "vllm.lora.ops.triton_ops"
# flag -> (module, attribute, parser type, help): each sets the module attribute before the layers are built
SWITCHES: dict[str, tuple[str, str, Callable[[str], Any], str]] = {
    "--pair-path-factor": (f"{_LORA}.moe_lora_config", "SMALL_BATCH_PAIRS_FACTOR", float,
                           "the per-pair LoRA path, without the (adapter, expert) alignment, while pairs * factor <= "
                           "experts * adapters"),
    "--pair-path-max-pairs": (f"{_LORA}.moe_lora_config", "SMALL_BATCH_MAX_PAIRS", int,
                              "the most pairs on the per-pair path"),
    "--pair-path-max-rank": (f"{_LORA}.moe_lora_config", "SMALL_BATCH_WIDE_MAX_RANK", int,
                             "above it the per-pair path keeps upstream's factor 8"),
    "--wide-rank-pair-tiles": (f"{_LORA}.moe_lora_config", "WIDE_RANK_PAIR_TILES", int,
                               "1: the per-pair kernel's K tiles of 512 and 8 warps at ranks 32-64; 0: the tiles "
                               "before"),
    "--pair-kernel": (f"{_LORA}.fused_moe_lora", "PAIR_KERNEL", int,
                      "the small-batch path's kernel: 0 = moe_lora_pair_kernel, 1 = moe_lora_pair_prefetch_kernel, "
                      "2 = the shrink split over K, then the expand (two launches)"),
    "--pair-split-width": (f"{_LORA}.fused_moe_lora", "_PAIR_SPLIT_WIDTH", int,
                           "K inputs per shrink program of the two launches"),
    "--pair-split-min-work": (f"{_LORA}.fused_moe_lora", "PAIR_SPLIT_MIN_WORK", int,
                              "the two launches from this many pairs x K x N on, at any slice width (0: only on "
                              "the wide slices)"),
    "--pair-split-fanout": (f"{_LORA}.fused_moe_lora", "PAIR_SPLIT_FANOUT", int,
                            "1: the two launches' expand with one N tile per program"),
    "--pair-split-expand-block-n": (f"{_LORA}.fused_moe_lora", "PAIR_SPLIT_EXPAND_BLOCK_N", int,
                                    "the fan-out expand's N tile"),
    "--sorted-early-ids": (f"{_LORA}.fused_moe_lora", "SORTED_EARLY_IDS", int,
                           "1: the sorted kernel loads its block's ids in one round trip before its early exits"),
    "--lora-side-stream": ("vllm.model_executor.layers.fused_moe.experts.lora_overlap", "LORA_SIDE_STREAM", int,
                           "1: the LoRA deltas on a side stream beside the base GEMMs, joined by the activation and "
                           "the top-k sum; 0: in place after each GEMM"),
    "--align-beside": ("vllm.model_executor.layers.fused_moe.experts.lora_overlap", "ALIGN_BESIDE", int,
                       "1: the sorted LoRA path's (adapter, expert) alignment on the side stream beside GEMM1"),
    "--fused-activation": ("vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm", "FUSED_ACTIVATION", int,
                           "1: the base layer's GEMM1 writes the gated activation itself"),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_switch_flags(p: argparse.ArgumentParser) -> None:
    """One optional flag per ``SWITCHES`` entry (default: the module's value, untouched)."""
    import importlib

    for flag, (module, attr, kind, text) in SWITCHES.items():
        default = getattr(importlib.import_module(module), attr)
        p.add_argument(flag, type=kind, default=None, help=f"{module.rsplit('.', 1)[-1]}.{attr} (now {default}): {text}")


def apply_switch_flags(args: argparse.Namespace) -> list[str]:
    """Set the module attributes of the flags given; returns "ATTR=value" for each.  A value is converted to the
    attribute's type (0/1 -> bool for a switch); 0 turns the work threshold off (None)."""
    import importlib

    done = []
    for flag, (module, attr, _kind, _text) in SWITCHES.items():
        value: Optional[Any] = getattr(args, _dest(flag), None)
        if value is None:
            continue
        mod = importlib.import_module(module)
        now = getattr(mod, attr)
        if isinstance(now, bool):
            value = bool(value)
        elif attr.endswith("_MIN_WORK"):
            value = value or None
        elif now is not None:
            value = type(now)(value)
        setattr(mod, attr, value)
        done.append(f"{attr}={value}")
    return done
