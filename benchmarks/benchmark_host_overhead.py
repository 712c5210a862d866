"""The engine's host time per decode step, with the model's forward replaced by random logits.

What a decode step costs besides the GPU: scheduling, block bookkeeping, sampling, output
processing and detokenization. On a GPU these run between two graph replays, so they add to the
step time (``benchmark_decode.py`` measures the sum). Here the model is stubbed (``compute_logits``
returns random logits of the right shape), so the figure is the host part alone and runs on any
machine, CPU included: step = (time for 33 tokens - time for 1) / 32, best of ``--repeat``, greedy,
``ignore_eos``, on the committed demo model.

Check first: every request produces all its tokens (the logits are random, so the tokens are not
compared; the real model's tokens are the test suite's business).

With ``--async-scheduling`` a second engine (``async_scheduling=True``) is timed alike, in a second
column: on a CPU nothing overlaps (the stubbed "device" work is done when it is queued), so the
difference is the bookkeeping that chaining costs; on a GPU ``benchmark_decode.py --async-scheduling``
measures what it gains.

    PYTHONPATH=. python benchmarks/benchmark_host_overhead.py [--batches 1 64 256] [--async-scheduling]
        [--out table.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.kernels.benchmark_moe_lora import emit  # noqa: E402

MODEL = os.path.join(_ROOT, "examples", "demo_model")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prefix-caching", action="store_true", help="on, as the engine default (off: as the decode benchmark)")
    p.add_argument("--async-scheduling", action="store_true", help="also time an engine with async scheduling")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.worker import model_runner

    engines = [LLM(MODEL, max_num_seqs=max(args.batches), max_model_len=64, seed=0,
                   enable_prefix_caching=args.prefix_caching, async_scheduling=chained)
               for chained in ((False, True) if args.async_scheduling else (False,))]
    vocab = engines[0].llm_engine.model_config.hf_config.vocab_size

    def stub(self, inp, on_prompt_logits=None, input_ids=None):  # the forward: random logits, one row per sequence
        return torch.randn(len(inp.query_lens), vocab)

    model_runner.ModelRunner.compute_logits = stub
    lines = [f"# Host time per decode step (model stubbed), {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}", ""]
    if args.async_scheduling:
        lines += ["| batch | host time / step | per sequence | with async scheduling | per sequence |",
                  "|---:|---:|---:|---:|---:|"]
    else:
        lines += ["| batch | host time / step | per sequence |", "|---:|---:|---:|"]
    for batch in args.batches:
        prompts = [{"prompt_token_ids": [int(t) for t in torch.randint(3, vocab, (24,))]} for _ in range(batch)]
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        many = SamplingParams(max_tokens=args.steps + 1, temperature=0, ignore_eos=True)
        row = f"| {batch} |"
        for llm in engines:
            outs = llm.generate(prompts, many, use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == args.steps + 1 for o in outs), "every request runs to the end"
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                llm.generate(prompts, one, use_tqdm=False)
                t1 = time.perf_counter()
                llm.generate(prompts, many, use_tqdm=False)
                t2 = time.perf_counter()
                best = min(best, ((t2 - t1) - (t1 - t0)) / args.steps)
            row += f" {best * 1e3:.3f} ms | {best * 1e6 / batch:.1f} us |"
        if args.async_scheduling:
            assert engines[1].llm_engine.async_scheduling.chained_steps > 0, "the async engine never chained"
        lines.append(row)
        print(lines[-1], flush=True)
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
