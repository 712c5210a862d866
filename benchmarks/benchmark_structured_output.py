"""Cost of the structured-output mask per decode step: the batched bitmask op at batch 64 and a
151936-token vocabulary (Qwen3's), and the sampler step without / with a grammar on every row.

Correctness first: the op's result equals a reference that unpacks each row's bits with numpy
(``np.unpackbits``, little bit order) and masks row by row (exit status 1 on a mismatch). Then, best of
``--repeat`` after a warm-up (synchronised on CUDA):

- copy: the [B, ceil(V/32)] int32 bitmask from (pinned) CPU memory to the device;
- mask: ``apply_token_bitmask_`` on all B rows, and on half of them in random order (``rows`` given), in
  place on a float32 work copy of the logits (repeating the op leaves the result unchanged): the torch
  path (a byte lookup table, the CPU default) next to the Triton kernel (the CUDA default; on a CPU only
  under TRITON_INTERPRET=1, where its times mean nothing), and with ``--llguidance`` llguidance's own
  ``llguidance.torch.apply_token_bitmask_inplace`` (torch.compile'd, all rows only; its first call
  compiles: ~50 s on a 2-core CPU);
- sampler: ``Sampler.forward`` on B greedy rows, without and with the grammar bitmask (its default path).

Filling the bitmask (llguidance, on the CPU, in parallel over rows) depends on the grammar and the
tokenizer; ``--tokenizer PATH`` adds it for a JSON schema at that tokenizer (its first use compiles).

    PYTHONPATH=. python benchmarks/benchmark_structured_output.py [--batch 64] [--vocab 151936]
        [--device cuda] [--tokenizer PATH] [--llguidance]
    # CPU smoke run of the Triton path:
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/benchmark_structured_output.py --batch 4 --vocab 1000 --repeat 2
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import numpy as np
import torch

from vllm.model_executor.layers.sampler import Sampler
from vllm.platforms.interface import triton_interpreting
from vllm.sampling_params import SamplingParams
from vllm.structured_output.bitmask import apply_token_bitmask_, bitmask_words
from vllm.triton_utils import HAS_TRITON


def best_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = logits.cpu().clone()
    vocab = out.shape[1]
    for r, row in enumerate(rows):
        bits = np.unpackbits(bitmask[r].cpu().numpy().view(np.uint8), bitorder="little")[:vocab].astype(bool)
        out[row, torch.from_numpy(~bits)] = float("-inf")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--llguidance", action="store_true",
                    help="also time llguidance.torch.apply_token_bitmask_inplace (all rows; compiles first)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    B, V = args.batch, args.vocab
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g).to(dev)
    cpu_mask = torch.randint(-2**31, 2**31 - 1, (B, bitmask_words(V)), generator=g, dtype=torch.int64).to(torch.int32)
    if dev.type == "cuda":
        cpu_mask = cpu_mask.pin_memory()
    mask = cpu_mask.to(dev)
    half = torch.randperm(B, generator=g)[:B // 2].tolist()  # a random half, in random order
    half_rows = torch.tensor(half, device=dev)

    ops: dict[str, Callable[..., None]] = {
        "torch (LUT)": lambda lg, m, r: apply_token_bitmask_(lg, m, r, use_triton=False)}
    if HAS_TRITON and (dev.type == "cuda" or triton_interpreting()):
        ops["Triton"] = lambda lg, m, r: apply_token_bitmask_(lg, m, r, use_triton=True)
    if args.llguidance:
        import llguidance.torch

        ops["llguidance.torch"] = lambda lg, m, r: llguidance.torch.apply_token_bitmask_inplace(lg, m)
    shapes = [(f"{B} rows", list(range(B)), None)]
    if B > 1:
        shapes.append((f"{len(half)} of {B} rows", half, half_rows))

    ok = True
    for name, op in ops.items():
        for what, rows, idx in shapes:
            if name == "llguidance.torch" and idx is not None:
                continue  # no row index: all rows only
            got = logits.clone()
            op(got, mask[:len(rows)], idx)
            if not torch.equal(got.cpu(), reference(logits, mask[:len(rows)], rows)):
                print(f"MISMATCH: the {name} mask op differs from the numpy reference ({what})")
                ok = False

    mask_table = []
    work = logits.clone()
    for what, rows, idx in shapes:
        cells = []
        for name, op in ops.items():
            if name == "llguidance.torch" and idx is not None:
                cells.append(None)
                continue
            m = mask[:len(rows)]
            cells.append(best_ms(lambda: op(work, m, idx), dev, args.repeat))
        mask_table.append((f"mask op, {what}", cells))

    params = [SamplingParams(temperature=0)] * B
    gens = [None] * B
    sampler = Sampler()
    all_rows = torch.arange(B, device=dev)
    table = [
        ("copy bitmask to device", best_ms(lambda: cpu_mask.to(dev, non_blocking=True), dev, args.repeat)),
        ("logits clone (float32, B x V)", best_ms(lambda: logits.clone(), dev, args.repeat)),
        ("sampler step, no grammar", best_ms(lambda: sampler(logits, params, gens), dev, args.repeat)),
        ("sampler step, grammar on every row",
         best_ms(lambda: sampler(logits, params, gens, grammar_bitmask=(all_rows, mask)), dev, args.repeat)),
    ]
    if args.tokenizer:
        from vllm.structured_output.backend import GrammarCompiler
        from vllm.structured_output.bitmask import fill_bitmask
        from vllm.structured_output.params import StructuredOutputsParams
        from vllm.transformers_utils.tokenizer import get_tokenizer

        compiler = GrammarCompiler(get_tokenizer(args.tokenizer), V)
        so = StructuredOutputsParams(json={"type": "object", "properties": {"name": {"type": "string"},
                                                                            "n": {"type": "integer"}}})
        try:
            states, what = [compiler.new_state(so) for _ in range(B)], "JSON schema"
        except ValueError:  # a vocabulary that cannot write JSON (the demo model's)
            so = StructuredOutputsParams(regex="[a-zA-Z]{1,64}")
            states, what = [compiler.new_state(so) for _ in range(B)], "regex"
        table.append((f"llguidance fill, {B} rows ({what}, start)",
                      best_ms(lambda: fill_bitmask(states, V, dev), dev, args.repeat)))
    print(f"batch {B}, vocab {V}, device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'})"
          + (", Triton interpreted (its times mean nothing)" if dev.type != "cuda" and "Triton" in ops else ""))
    print("| mask op (in place, ms) | " + " | ".join(ops) + " |\n|---|" + "---:|" * len(ops))
    for name, cells in mask_table:
        print(f"| {name} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")
    print()
    print("| step | ms |\n|---|---|")
    for name, ms in table:
        print(f"| {name} | {ms:.3f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
