"""The decode path's kernel variants as command-line flags, shared by benchmark_decode.py and profile_decode.py:
each flag turns on one module switch (the engines run in the benchmark's process, one GPU) before the engines
are built."""
from __future__ import annotations

import argparse


def add_variant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dense-gemv-max-tokens", type=int, default=None,
                   help="the dense projections' Triton GEMV up to this many tokens (ops/dense_gemv.py "
                        "GEMV_MAX_TOKENS; default: the module's)")
    p.add_argument("--dense-gemv-delayed", action="store_true",
                   help="the dense GEMV's kernel that reduces each token's partials once (GEMV_DELAYED)")
    p.add_argument("--moe-fused-activation", action="store_true",
                   help="GEMM1 of the MoE layers writes the gated activation itself on steps without LoRA "
                        "(fused_moe_gemm.FUSED_ACTIVATION)")
    p.add_argument("--fused-kv-write", action="store_true",
                   help="the q/k norm + rotary launch stores K/V into the cache itself (attention.FUSED_KV_WRITE)")
    p.add_argument("--moe-lora-pair-fanout", type=int, default=None, choices=[0, 1],
                   help="1: the MoE LoRA small-batch path in two launches from the module's work threshold on, its "
                        "expand one N tile of 256 per program (fused_moe_lora.PAIR_SPLIT_MIN_WORK / "
                        "PAIR_SPLIT_FANOUT / PAIR_SPLIT_EXPAND_BLOCK_N; the default since the twenty-second "
                        "session); 0: the kernels before it")
    p.add_argument("--moe-lora-side-stream", type=int, default=None, choices=[0, 1],
                   help="1: the MoE LoRA deltas on a side stream beside the base GEMMs, joined by the activation and "
                        "the top-k sum (experts/lora_overlap.LORA_SIDE_STREAM); 0: in place after each GEMM")
    p.add_argument("--dense-lora-side-stream", type=int, default=None, choices=[0, 1],
                   help="1: the dense LoRA deltas on a side stream beside the projections, joined by one add "
                        "(vllm/lora/layers/dense_overlap.DENSE_LORA_SIDE_STREAM); 0: in place after each")
    p.add_argument("--all-fusions", action="store_true",
                   help="the fusions above (the MoE activation in GEMM1, the KV write in q/k norm + rotary)")
    p.add_argument("--flip", action="append", default=[], metavar="SWITCH",
                   help="turn a switch of TOGGLES to the other side of its shipped default (repeatable; e.g. the "
                        "winners of decode_switch_ab.py before they ship): " + ", ".join(TOGGLES))


def apply_variant_flags(a: argparse.Namespace) -> list[str]:
    """Set the switches the flags ask for (a switch already on stays on); returns the names of those on."""
    from vllm.lora.layers import dense_overlap
    from vllm.model_executor.layers import attention
    from vllm.model_executor.layers.fused_moe.experts import lora_overlap
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm
    from vllm.model_executor.layers.ops import dense_gemv

    for flag in getattr(a, "flip", []):
        if flag not in TOGGLES:
            raise SystemExit(f"--flip {flag}: not a decode switch; the switches: {', '.join(TOGGLES)}")
        flip_switch(flag, keep_others=True)
    every = a.all_fusions
    fused_moe_gemm.FUSED_ACTIVATION |= a.moe_fused_activation or every
    attention.FUSED_KV_WRITE |= a.fused_kv_write or every
    if a.dense_gemv_max_tokens is not None:
        dense_gemv.GEMV_MAX_TOKENS = a.dense_gemv_max_tokens
    dense_gemv.GEMV_DELAYED |= a.dense_gemv_delayed
    if getattr(a, "moe_lora_pair_fanout", None) is not None:
        set_pair_fanout(bool(a.moe_lora_pair_fanout))
    if getattr(a, "moe_lora_side_stream", None) is not None:
        lora_overlap.LORA_SIDE_STREAM = bool(a.moe_lora_side_stream)
    if getattr(a, "dense_lora_side_stream", None) is not None:
        dense_overlap.DENSE_LORA_SIDE_STREAM = bool(a.dense_lora_side_stream)
    on = {"FUSED_ACTIVATION": fused_moe_gemm.FUSED_ACTIVATION, "FUSED_KV_WRITE": attention.FUSED_KV_WRITE,
          "GEMV_DELAYED": dense_gemv.GEMV_DELAYED, "PAIR_SPLIT_FANOUT": pair_fanout_on(),
          "LORA_SIDE_STREAM": lora_overlap.LORA_SIDE_STREAM,
          "DENSE_LORA_SIDE_STREAM": dense_overlap.DENSE_LORA_SIDE_STREAM}
    return [k for k, v in on.items() if v] + [f"{flag} flipped" for flag in getattr(a, "flip", [])]


#: the on / off switches of the decode path: flag -> (module, attribute)
TOGGLES = {"moe-fused-activation": ("vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm", "FUSED_ACTIVATION"),
           "fused-kv-write": ("vllm.model_executor.layers.attention", "FUSED_KV_WRITE"),
           "moe-lora-side-stream": ("vllm.model_executor.layers.fused_moe.experts.lora_overlap", "LORA_SIDE_STREAM"),
           "dense-lora-side-stream": ("vllm.lora.layers.dense_overlap", "DENSE_LORA_SIDE_STREAM"),
           # None (the shipped default) defers to VLLM_FUSED_LORA_LINEAR; flipped: True
           "dense-fused-lora": ("vllm.lora.layers.linear", "FUSED_DECODE"),
           "dense-lora-sorted-split": ("vllm.lora.ops.triton_ops.lora_linear_sorted_split", "SORTED_SPLIT"),
           # the q/k/v and o projections' LoRA deltas added by the norms and q/k norm + rotary around them
           # (vllm/lora/layers/dense_handoff.py)
           "dense-lora-handoff": ("vllm.lora.layers.dense_handoff", "HANDOFF"),
           # the w13 LoRA slices of a fused gate_up adapter read one A (vllm/lora/layers/fused_moe.py)
           "moe-lora-shared-w13-a": ("vllm.lora.layers.fused_moe", "SHARE_W13_A"),
           # the sorted MoE LoRA path's (adapter, expert) alignment on the side stream beside GEMM1
           "moe-lora-align-beside": ("vllm.model_executor.layers.fused_moe.experts.lora_overlap", "ALIGN_BESIDE"),
           # the sorted MoE LoRA kernel's block ids in one round trip before its early exits
           "moe-lora-early-ids": ("vllm.lora.ops.triton_ops.fused_moe_lora", "SORTED_EARLY_IDS"),
           # the dense LoRA as extra input columns of the projection's GEMM, from 65 rows (set at engine build)
           "dense-lora-concat": ("vllm.lora.layers.dense_concat", "CONCAT_K")}
#: switches of the LoRA path: a step without LoRA runs none of their code (decode_switch_ab.py skips those engines)
LORA_PATH = {"moe-lora-side-stream", "dense-lora-side-stream", "dense-fused-lora", "dense-lora-sorted-split",
             "moe-lora-pair-fanout", "dense-lora-handoff", "moe-lora-shared-w13-a", "moe-lora-align-beside",
             "moe-lora-early-ids", "dense-lora-concat"}
_toggle_defaults: dict[str, object] = {}


def _remember_defaults() -> dict[str, object]:
    """Each ``TOGGLES`` flag -> its module, its shipped default recorded (as first seen here)."""
    import importlib

    mods = {}
    for flag, (mod, name) in TOGGLES.items():
        mods[flag] = m = importlib.import_module(mod)
        _toggle_defaults.setdefault(flag, getattr(m, name))
    return mods


def shipped_switches() -> None:
    """Every switch of ``TOGGLES`` and the pair fan-out back to the module's own default (as first seen here)."""
    for flag, m in _remember_defaults().items():
        setattr(m, TOGGLES[flag][1], _toggle_defaults[flag])
    if _pair_defaults:
        set_pair_fanout(True)


def flip_switch(flag: str, keep_others: bool = False) -> str:
    """Turn one switch (a ``TOGGLES`` flag or ``moe-lora-pair-fanout``) to the other side of its shipped default,
    every other one back to its own first (``keep_others``: left as they are); returns what it did, e.g.
    "LORA_SIDE_STREAM off"."""
    if not keep_others:
        shipped_switches()
    mods = _remember_defaults()
    if flag == "moe-lora-pair-fanout":
        on = not pair_fanout_on()
        set_pair_fanout(on)
        return f"PAIR_SPLIT_FANOUT {'on' if on else 'off'}"
    m, name = mods[flag], TOGGLES[flag][1]
    setattr(m, name, not _toggle_defaults[flag])
    return f"{name} {'on' if getattr(m, name) else 'off'}"


_PAIR_SWITCHES = ("PAIR_SPLIT_MIN_WORK", "PAIR_SPLIT_FANOUT", "PAIR_SPLIT_EXPAND_BLOCK_N")
_pair_defaults: dict[str, object] = {}


def set_pair_fanout(on: bool) -> None:
    """The MoE LoRA small-batch path's two launches with the expand fan-out (on: the module's own defaults, as
    first seen here), or the kernels before them (off: the split only on Mixtral-8x7B's wide slices, its expand by
    the config's N-splits)."""
    from vllm.lora.ops.triton_ops import fused_moe_lora as f

    if not _pair_defaults:
        _pair_defaults.update({name: getattr(f, name) for name in _PAIR_SWITCHES})
    for name in _PAIR_SWITCHES:
        setattr(f, name, _pair_defaults[name] if on else (False if name == "PAIR_SPLIT_FANOUT" else None))


def pair_fanout_on() -> bool:
    from vllm.lora.ops.triton_ops import fused_moe_lora as f

    return f.PAIR_SPLIT_FANOUT


def apply_sets(assignments: list[str]) -> list[str]:
    """``--set MODULE.ATTR=VALUE`` (e.g. ``vllm.lora.ops.triton_ops.lora_concat.SLOT_GROUP=4``): set a module
    constant for every engine of the run (a tile knob a sweep picked, not a switch the A/B flips); VALUE is a Python
    literal (else a string).  The attribute must exist.  Returns what was set, for the report."""
    import ast
    import importlib

    done = []
    for item in assignments:
        name, sep, raw = item.partition("=")
        mod_name, _, attr = name.strip().rpartition(".")
        if not sep or not mod_name or not attr:
            raise SystemExit(f"--set {item!r}: expected MODULE.ATTR=VALUE, e.g. "
                             "vllm.lora.ops.triton_ops.lora_concat.SLOT_GROUP=4")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as exc:
            raise SystemExit(f"--set {item!r}: cannot import {mod_name}: {exc}") from None
        if not hasattr(mod, attr):
            raise SystemExit(f"--set {item!r}: {mod_name} has no attribute {attr}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        setattr(mod, attr, value)
        done.append(f"{mod_name}.{attr}={value!r}")
    return done

