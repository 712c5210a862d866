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

``--lora``: the host time a LoRA step adds.  For each ``--layers`` count, a random Qwen3-MoE checkpoint
of a tiny width (``benchmark_decode.py --preset tiny``) and 4 random PEFT adapters of rank 16 on q/k/v/o
and the experts; one engine without LoRA and one with ``max_loras=4``, the requests spread over the
adapters.  The stub keeps the host work of a CUDA-graph decode step (``ModelRunner.prepare_step``: the
LoRA mapping and the graph key; then the copy of the step's inputs into the graph buffers), so the
difference between the two columns is what LoRA costs the host per step.  Here a step's time is the
median of ``LLMEngine.step`` over the decode steps (robust to a busy machine); the last two columns are
the median time of ``ModelRunner.prepare_step`` over the decode steps.  ``--punica gpu`` (default)
uses the Triton Punica wrapper the GPU engine uses (its host side: on CPU tensors, under
``TRITON_INTERPRET=1``; no kernel runs, the forward is stubbed).  ``--profile`` prints the cProfile of
the LoRA engine's steps at the largest batch.

    PYTHONPATH=. python benchmarks/benchmark_host_overhead.py --lora [--layers 12 48] [--batches 1 16 64 256]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.kernels.benchmark_moe_lora import emit  # noqa: E402

MODEL = os.path.join(_ROOT, "examples", "demo_model")


def _steps_time(llm, prompts, steps: int, repeat: int, loras) -> float:
    """Best (t(steps + 1 tokens) - t(1 token)) / steps over ``repeat`` tries, after checking every request
    runs to the end."""
    from vllm import SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, many, lora_request=loras, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == steps + 1 for o in outs), "every request runs to the end"
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        llm.generate(prompts, one, lora_request=loras, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate(prompts, many, lora_request=loras, use_tqdm=False)
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) - (t1 - t0)) / steps)
    return best


def _median_step(llm, prompts, steps: int, repeat: int, loras) -> float:
    """Median wall time of one engine step over the decode steps of ``repeat`` runs of ``steps + 1`` tokens
    (each run's first step, the prefill, left out): less sensitive to a busy machine than a difference of
    totals."""
    from vllm import SamplingParams

    engine, times = llm.llm_engine, []
    real_step = engine.step

    def timed_step():
        t0 = time.perf_counter()
        out = real_step()
        times[-1].append(time.perf_counter() - t0)
        return out

    engine.step = timed_step
    try:
        for _ in range(repeat):
            times.append([])
            llm.generate(prompts, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True),
                         lora_request=loras, use_tqdm=False)
    finally:
        del engine.step
    return statistics.median(t for run in times for t in run[1:])


def lora_main(args) -> None:
    """``--lora``: host time per decode step with and without LoRA (see the module docstring)."""
    import cProfile
    import pstats
    import tempfile
    from types import SimpleNamespace

    if args.punica == "gpu" and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton wrapper on CPU tensors (no kernel runs)
    from benchmarks.benchmark_decode import PRESETS, build_model_and_adapters
    import vllm.lora.punica_wrapper as punica_wrapper
    from vllm import LLM
    from vllm.worker import model_runner
    from vllm.worker.cuda_graphs import DecodeGraphRunner

    get_wrapper = punica_wrapper.get_punica_wrapper
    punica_wrapper.get_punica_wrapper = lambda *a, **k: get_wrapper(*a, **{**k, "kind": args.punica})

    def stub(self, inp, on_prompt_logits=None, input_ids=None):  # the host part of a graph step, random logits
        t0 = time.perf_counter()
        key = self.prepare_step(inp)
        if len(inp.input_ids) == len(inp.query_lens):  # a decode step: its mapping and graph key's time
            self._prepare_s.append(time.perf_counter() - t0)
        if key is not None:
            self.graphs.buffers.prepare(inp.input_ids, inp.positions, inp.slot_mapping, inp.seq_lens,
                                        inp.block_tables, key[0])
        return torch.randn(len(inp.query_lens), self._vocab)

    model_runner.ModelRunner.compute_logits = stub
    top, rank, num_loras = max(args.batches), 16, 4
    lines = [f"# Host time per decode step, LoRA vs none (model stubbed; CPU: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
             f"{args.punica} Punica wrapper; {num_loras} adapters of rank {rank} spread over the batch)", "",
             "| layers | batch | no LoRA, step | LoRA, step | LoRA - no LoRA | prepare_step, no LoRA "
             "| prepare_step, LoRA |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for layers in args.layers:
        a = SimpleNamespace(**PRESETS["tiny"], preset="tiny", layers=layers, num_loras=num_loras, rank=rank,
                            dtype="float32")
        model_dir, adapters = build_model_and_adapters(a, "bench_host_lora_")
        prompts = [{"prompt_token_ids": [int(t) for t in torch.randint(3, a.vocab, (24,))]} for _ in range(top)]
        common = dict(max_num_seqs=top, max_model_len=64, seed=0, enable_prefix_caching=False, dtype="float32",
                      num_gpu_blocks_override=top * 4 + 16)  # every sequence's 64 tokens: no preemption
        engines = {False: LLM(model_dir, **common),
                   True: LLM(model_dir, **common, enable_lora=True, max_loras=num_loras, max_lora_rank=rank)}
        for llm in engines.values():
            runner = llm.llm_engine.runner
            runner._vocab, runner._prepare_s = a.vocab, []
            if runner.graphs is None:  # CPU: the graph runner's host side only (keys, buffers), never captured
                runner.graphs = DecodeGraphRunner(runner.model, block_size=runner.block_size, max_model_len=64,
                                                  max_num_seqs=top, device=runner.device,
                                                  lora_manager=runner.lora_manager, sizes=args.batches,
                                                  emulate=True)
                runner.graphs.buffers.allocate()
        for batch in args.batches:
            spread = [adapters[i % num_loras] for i in range(batch)]
            prep = {}
            for lora_on, llm in engines.items():
                llm.llm_engine.runner._prepare_s.clear()
            _steps_time(engines[False], prompts[:batch], args.steps, 1, None)  # warm-up, checks every request ends
            _steps_time(engines[True], prompts[:batch], args.steps, 1, spread)
            base = _median_step(engines[False], prompts[:batch], args.steps, args.repeat, None)
            lora = _median_step(engines[True], prompts[:batch], args.steps, args.repeat, spread)
            for lora_on, llm in engines.items():  # median over the decode steps: robust to a busy machine
                prep[lora_on] = statistics.median(llm.llm_engine.runner._prepare_s)
            lines.append(f"| {layers} | {batch} | {base * 1e3:.3f} ms | {lora * 1e3:.3f} ms | "
                         f"{(lora - base) * 1e6:+.0f} us | {prep[False] * 1e6:.1f} us | {prep[True] * 1e6:.1f} us |")
            print(lines[-1], flush=True)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            _steps_time(engines[True], prompts[:top], args.steps, 1, [adapters[i % num_loras] for i in range(top)])
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        for llm in engines.values():
            llm.llm_engine.shutdown()
    emit("\n".join(lines), args.out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prefix-caching", action="store_true", help="on, as the engine default (off: as the decode benchmark)")
    p.add_argument("--async-scheduling", action="store_true", help="also time an engine with async scheduling")
    p.add_argument("--out", default=None)
    p.add_argument("--lora", action="store_true", help="host time with 4 rank-16 adapters vs none, per --layers")
    p.add_argument("--layers", nargs="+", type=int, default=[12, 48], help="--lora: model depths")
    p.add_argument("--punica", choices=["gpu", "cpu"], default="gpu", help="--lora: the Punica wrapper's kind")
    p.add_argument("--profile", action="store_true", help="--lora: cProfile the LoRA steps at the largest batch")
    args = p.parse_args()
    if args.lora:
        lora_main(args)
        return

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
