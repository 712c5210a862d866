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
difference between the two columns is what LoRA costs the host per step.  A step's time is given as the
median and the minimum of ``LLMEngine.step`` over the decode steps of ``--repeat`` runs of each engine, run
in turn (the minimum is the less disturbed by other jobs on a shared machine; ``--clock cpu`` times the
engine thread's CPU time instead of the wall clock, which other jobs disturb less); the last two columns
are the median time of ``ModelRunner.prepare_step`` over the decode steps.  "Before the forward": the host
work of a synchronous decode step up to its forward (schedule, the registry's adapter check, the runner's
inputs, ``prepare_step``), repeated over the same running requests, min of 500 (the engines in turn:
steadier on a busy machine than whole steps).  ``--async-scheduling``: both
engines with async scheduling (the default on one GPU; on a CPU nothing overlaps, so it is the chained
steps' bookkeeping).  ``--punica gpu`` (default) uses the Triton Punica wrapper the GPU engine uses (its
host side: on CPU tensors, under ``TRITON_INTERPRET=1``; no kernel runs, the forward is stubbed).
``--profile`` runs both engines' decode steps at the largest batch under cProfile and prints the functions
whose time per step differs most, then those only the LoRA engine calls.

    PYTHONPATH=. python benchmarks/benchmark_host_overhead.py --lora [--layers 12 48] [--batches 1 16 64 256]
        [--async-scheduling] [--profile]
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


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def _decode_step_times(llm, prompts, steps: int, loras, clock=time.perf_counter) -> list[float]:
    """``clock`` time of each ``LLMEngine.step`` of one run of ``steps + 1`` tokens, the first (the prefill)
    left out."""
    from vllm import SamplingParams

    engine, times = llm.llm_engine, []
    real_step = engine.step

    def timed_step():
        t0 = clock()
        out = real_step()
        times.append(clock() - t0)
        return out

    engine.step = timed_step
    try:
        llm.generate(prompts, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True),
                     lora_request=loras, use_tqdm=False)
    finally:
        del engine.step
    return times[1:]


def _prepare_times(engines: dict, prompts, loras: dict, reps: int = 500) -> dict:
    """The host work before a synchronous decode step's forward, on the CPU alone, per engine (min of
    ``reps``, the engines timed in turn): the scheduler's decode batch, the registry's adapter check, the
    runner's inputs and ``prepare_step`` (LoRA mapping, graph key), over the same running requests, which
    this work leaves as it found them."""
    from vllm import SamplingParams
    from vllm.worker.model_runner import ModelInput

    ids = [f"prepare-{i}" for i in range(len(prompts))]
    chains = {}
    for key, llm in engines.items():
        engine = llm.llm_engine
        chains[key], engine.async_scheduling = engine.async_scheduling, None  # (no step is pending now)
        for i, (rid, prompt) in enumerate(zip(ids, prompts)):
            engine.add_request(rid, prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                               lora_request=loras[key][i] if loras[key] else None)
        engine.step()  # the prefill
        engine.step()  # one decode step
    best = {key: float("inf") for key in engines}
    try:
        for _ in range(reps):
            for key, llm in engines.items():
                engine = llm.llm_engine
                sched, runner = engine.scheduler, engine.runner
                t0 = time.perf_counter()
                out = sched.schedule()
                engine.loras.check_batch(out)
                inp = ModelInput.from_scheduler_output(out, runner.block_size, runner.lora_manager is not None)
                runner.prepare_step(inp)
                best[key] = min(best[key], time.perf_counter() - t0)
                assert not out.is_prefill and len(out.scheduled_seqs) == len(prompts), "a decode of every request"
    finally:
        for key, llm in engines.items():
            llm.llm_engine.abort_request(ids)
            llm.llm_engine.async_scheduling = chains[key]
    return best


def _profile_decode(llm, prompts, steps: int, loras) -> tuple[dict, int]:
    """cProfile of the decode steps of one run: {function: (calls, cumulative s)} and the number of steps."""
    import cProfile
    import pstats
    from vllm import SamplingParams

    engine, prof, count = llm.llm_engine, cProfile.Profile(), [0]
    real_step = engine.step

    def profiled_step():
        count[0] += 1
        if count[0] == 1:  # the prefill
            return real_step()
        prof.enable()
        try:
            return real_step()
        finally:
            prof.disable()

    engine.step = profiled_step
    try:
        llm.generate(prompts, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True),
                     lora_request=loras, use_tqdm=False)
    finally:
        del engine.step
    return {f: (v[1], v[3]) for f, v in pstats.Stats(prof).stats.items()}, count[0] - 1


def _profile_diff(engines: dict, prompts, steps: int, loras, top: int = 30) -> str:
    """Per decode step, the functions whose cumulative time differs most between the LoRA engine and the
    one without (cProfile: inflated by the profiler, compare the two columns), then the functions only
    the LoRA engine calls."""
    (base, n0), (lora, n1) = _profile_decode(engines[False], prompts, steps, None), \
        _profile_decode(engines[True], prompts, steps, loras)

    def name(f) -> str:
        path = f[0].replace(_ROOT + os.sep, "")
        return f"{path}:{f[1]}({f[2]})" if f[0] != "~" else f[2]

    rows = []
    for f in set(base) | set(lora):
        (c0, t0), (c1, t1) = base.get(f, (0, 0.0)), lora.get(f, (0, 0.0))
        rows.append((t1 / n1 - t0 / n0, c0 / n0, c1 / n1, t0 / n0, t1 / n1, name(f)))
    lines = [f"cProfile, per decode step ({n0} / {n1} steps; us, cumulative): the largest differences",
             "| LoRA - no LoRA | no LoRA | LoRA | calls no LoRA | calls LoRA | function |",
             "|---:|---:|---:|---:|---:|---|"]
    for d, c0, c1, t0, t1, fn in sorted(rows, key=lambda r: -abs(r[0]))[:top]:
        lines.append(f"| {d * 1e6:+.1f} | {t0 * 1e6:.1f} | {t1 * 1e6:.1f} | {c0:.1f} | {c1:.1f} | `{fn}` |")
    lines += ["", "Functions only the LoRA engine calls (us per decode step, cumulative; calls per step):"]
    only = sorted((r for r in rows if r[1] == 0 and r[2] > 0), key=lambda r: -r[4])
    lines += [f"- `{fn}`: {t1 * 1e6:.1f} us, {c1:.2f} calls" for _, _, c1, _, t1, fn in only[:top]]
    return "\n".join(lines)


def lora_main(args) -> None:
    """``--lora``: host time per decode step with and without LoRA (see the module docstring)."""
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
        t0 = CLOCKS[args.clock]()
        key = self.prepare_step(inp)
        if len(inp.input_ids) == len(inp.query_lens):  # a decode step: its mapping and graph key's time
            self._prepare_s.append(CLOCKS[args.clock]() - t0)
        if key is not None:
            self.graphs.buffers.prepare(inp.input_ids, inp.positions, inp.slot_mapping, inp.seq_lens,
                                        inp.block_tables, key[0])
        return torch.randn(len(inp.query_lens), self._vocab)

    model_runner.ModelRunner.compute_logits = stub
    top, rank, num_loras = max(args.batches), 16, 4
    mode = "async scheduling" if args.async_scheduling else "synchronous steps"
    lines = [f"# Host time per decode step, LoRA vs none (model stubbed; CPU: "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
             f"{args.punica} Punica wrapper; {num_loras} adapters of rank {rank} spread over the batch; {mode})",
             "", f"Per decode step ({args.clock} clock), median / min over the steps of {args.repeat} runs of each "
             "engine, in turn.", "",
             "| layers | batch | no LoRA, step | LoRA, step | LoRA - no LoRA | prepare_step, no LoRA "
             "| prepare_step, LoRA | before the forward, no LoRA | before the forward, LoRA |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    profiles = []
    for layers in args.layers:
        a = SimpleNamespace(**PRESETS["tiny"], preset="tiny", layers=layers, num_loras=num_loras, rank=rank,
                            dtype="float32")
        model_dir, adapters = build_model_and_adapters(a, "bench_host_lora_")
        prompts = [{"prompt_token_ids": [int(t) for t in torch.randint(3, a.vocab, (24,))]} for _ in range(top)]
        common = dict(max_num_seqs=top, max_model_len=64, seed=0, enable_prefix_caching=False, dtype="float32",
                      num_gpu_blocks_override=top * 4 + 16,  # every sequence's 64 tokens: no preemption
                      async_scheduling=args.async_scheduling)
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
            loras = {False: None, True: spread}
            _steps_time(engines[False], prompts[:batch], args.steps, 1, None)  # warm-up, checks every request ends
            _steps_time(engines[True], prompts[:batch], args.steps, 1, spread)
            steps: dict = {False: [], True: []}
            for llm in engines.values():
                llm.llm_engine.runner._prepare_s.clear()
            for _ in range(args.repeat):  # in turn: a busy machine slows both alike
                for lora_on, llm in engines.items():
                    steps[lora_on] += _decode_step_times(llm, prompts[:batch], args.steps, loras[lora_on],
                                                         CLOCKS[args.clock])
            med = {k: statistics.median(v) for k, v in steps.items()}
            low = {k: min(v) for k, v in steps.items()}
            prep = {k: statistics.median(llm.llm_engine.runner._prepare_s) for k, llm in engines.items()}
            before = _prepare_times(engines, prompts[:batch], loras)
            lines.append(f"| {layers} | {batch} | {med[False] * 1e3:.3f} / {low[False] * 1e3:.3f} ms "
                         f"| {med[True] * 1e3:.3f} / {low[True] * 1e3:.3f} ms "
                         f"| {(med[True] - med[False]) * 1e6:+.0f} / {(low[True] - low[False]) * 1e6:+.0f} us "
                         f"| {prep[False] * 1e6:.1f} us | {prep[True] * 1e6:.1f} us "
                         f"| {before[False] * 1e6:.1f} us | {before[True] * 1e6:.1f} us |")
            print(lines[-1], flush=True)
        if args.async_scheduling:
            assert all(llm.llm_engine.async_scheduling.chained_steps > 0 for llm in engines.values()), \
                "an engine never chained a step"
        if args.profile:
            profiles.append(f"{layers} layers, batch {top}, {mode}: " + _profile_diff(
                engines, prompts[:top], args.steps, [adapters[i % num_loras] for i in range(top)]))
            print(profiles[-1], flush=True)
        for llm in engines.values():
            llm.llm_engine.shutdown()
    emit("\n\n".join(["\n".join(lines), *profiles]), args.out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prefix-caching", action="store_true", help="on, as the engine default (off: as the decode benchmark)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="also time an engine with async scheduling (--lora: both engines use it)")
    p.add_argument("--out", default=None)
    p.add_argument("--lora", action="store_true", help="host time with 4 rank-16 adapters vs none, per --layers")
    p.add_argument("--layers", nargs="+", type=int, default=[12, 48], help="--lora: model depths")
    p.add_argument("--punica", choices=["gpu", "cpu"], default="gpu", help="--lora: the Punica wrapper's kind")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="--lora: wall time, or the engine thread's CPU time (steadier on a shared machine)")
    p.add_argument("--profile", action="store_true",
                   help="--lora: cProfile both engines' decode steps at the largest batch, print the differences")
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
    from benchmarks.benchmark_engine_lora import exit_on_sigterm

    exit_on_sigterm()  # a timeout still removes the scratch checkpoint
    main()
