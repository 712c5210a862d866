"""One decode switch at a time (``decode_variants.py``'s flags) flipped from its shipped default, against the
shipped defaults: the engine's CUDA-graph decode step without LoRA (and with ``--lora`` with rank-16 adapters
spread over the batch), async scheduling on, one engine per (switch, LoRA), the model and prompts of
benchmark_decode.py built once.  Greedy tokens are checked against the shipped run; the table gives each
flipped switch's step time and its ratio to the shipped one.  Switches of the LoRA path (``LORA_PATH``) get no
engine without LoRA: they change nothing there.

    PYTHONPATH=. python benchmarks/decode_switch_ab.py [--batches 1] [--switches moe-fused-activation ...]
        [--lora | --lora-only] [--rounds 1] [--set MODULE.ATTR=VALUE ...] [--out ab.md]

``--rounds N``: the whole list of engines N times in turn (shipped, flipped, shipped, flipped, ...), each cell the
fastest of its N runs, every run listed under the table: a switch worth ~1 % needs the spread between engines.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_decode import PRESETS, exit_on_sigterm, build_model_and_adapters, random_prompts, run_engine  # noqa: E402
from decode_variants import LORA_PATH, TOGGLES, apply_sets, flip_switch, shipped_switches  # noqa: E402

SWITCHES = [*TOGGLES, "moe-lora-pair-fanout"]


def _set(flag: Optional[str]) -> str:
    """Every switch at its shipped default, then ``flag`` flipped (None: none); returns what was flipped."""
    if flag is None:
        shipped_switches()
        return "none (shipped defaults)"
    return flip_switch(flag)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batches", default="1")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--switches", nargs="+", default=SWITCHES, choices=SWITCHES)
    p.add_argument("--lora", action="store_true", help="also the LoRA step (adapters spread over the batch)")
    p.add_argument("--lora-only", action="store_true",
                   help="only the LoRA step (switches of the LoRA path: their no-LoRA engines would time the "
                        "shipped build again, ~50 s each)")
    p.add_argument("--rounds", type=int, default=1, help="run every engine this many times, in turn")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.ATTR=VALUE",
                   help="a module constant for every engine of the run (e.g. a tile knob a sweep picked); repeatable")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    settings = apply_sets(a.set)
    for k, v in PRESETS[a.preset].items():
        setattr(a, k, v)
    batches = [int(x) for x in a.batches.split(",")]
    model_dir, adapters = build_model_and_adapters(a, "decode_ab_")
    prompts = random_prompts(a, max(batches))
    max_len = a.prompt_len + a.steps + 8
    common = dict(dtype=a.dtype, max_model_len=max_len, max_num_seqs=max(batches), cuda_graph_sizes=batches,
                  num_gpu_blocks_override=max(batches) * (-(-max_len // 16)) + 64, enable_prefix_caching=False,
                  async_scheduling=True)
    lora_kw = dict(enable_lora=True, max_loras=a.num_loras, max_lora_rank=2 * a.rank)
    spread = lambda b: [adapters[i % a.num_loras] for i in range(b)]  # noqa: E731
    # a switch of the LoRA path changes nothing without LoRA: no engine for it there
    cases = [] if a.lora_only else [(None, False)] + [(s, False) for s in a.switches if s not in LORA_PATH]
    if a.lora or a.lora_only:
        cases += [(None, True)] + [(s, True) for s in a.switches]
    if a.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {a.rounds}")
    runs: dict = {case: [] for case in cases}
    tokens = {}
    for r in range(a.rounds):
        for flag, lora in cases:
            flipped = _set(flag)
            print(f"== round {r + 1}: {flag or 'base'}{' + LoRA' if lora else ''}: flipped {flipped}", flush=True)
            t, tok = run_engine(model_dir, common, batches, prompts, spread if lora else (lambda b: None), a.steps,
                                **(lora_kw if lora else {}))
            runs[(flag, lora)].append(t)
            tokens.setdefault((flag, lora), tok)
    times = {case: {b: min(t[b] for t in ts) for b in batches} for case, ts in runs.items()}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [f"{gpu}, {a.dtype}; {a.preset} width, {a.layers} layers; CUDA graphs + async scheduling; one switch "
             f"at a time, flipped from its shipped default" + (f"; set: {', '.join(settings)}" if settings else ""),
             "",
             "| flipped switch | LoRA | " + " | ".join(f"batch {b}" for b in batches) + " | tokens |",
             "|---|---|" + "---:|" * len(batches) + "---|"]
    bad = 0
    for flag, lora in cases:
        base = times[(None, lora)]  # (a run without LoRA has no base when every switch is of the LoRA path)
        same = all(tokens[(flag, lora)][b] == tokens[(None, lora)][b] for b in batches)
        bad += not same
        cells = " | ".join(f"{times[(flag, lora)][b] * 1e3:.3f} ms ({times[(flag, lora)][b] / base[b]:.3f})"
                           for b in batches)
        lines.append(f"| {flag or 'none'} | {'yes' if lora else 'no'} | {cells} | "
                     f"{'identical' if same else 'DIFFER'} |")
    if a.rounds > 1:
        lines += ["", "Every run (ms, in turn): " + "; ".join(
            f"{flag or 'none'}{' + LoRA' if lora else ''}: " + ", ".join(
                "/".join(f"{t[b] * 1e3:.3f}" for b in batches) for t in runs[(flag, lora)]) for flag, lora in cases)]
    report = "\n".join(lines)
    print(report)
    if a.out:
        with open(a.out, "w") as f:
            f.write(report + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    exit_on_sigterm()  # a timeout still removes the scratch checkpoint
    sys.exit(main())
