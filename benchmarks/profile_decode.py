"""Where a decode step's GPU time goes: torch.profiler over N engine decode steps at one batch size,
without and with LoRA, eager (every kernel visible to the host) and with CUDA graphs (issue 10).

The checkpoint and adapters are benchmark_decode.py's (``--preset``, ``--layers``, rank-``--rank``
adapters spread over the batch).  Per case: the engine runs its prefill and two warm-up decode steps
unprofiled, then ``--steps`` decode steps (``LLMEngine.step``) under the profiler.  Printed and written
to ``--out`` (markdown): GPU kernels per step, GPU busy time per step (sum of kernel times), host
wall time per step, and the top kernels by GPU time (calls per step, us per call, share).

    PYTHONPATH=. python benchmarks/profile_decode.py [--preset qwen3-30b-a3b] [--layers 12]
        [--batches 1,64] [--steps 8] [--modes eager,graphs] [--prefill] [--all-fusions ...] [--out profile.md]

``--prefill``: the batch's prefill steps instead (one unprofiled prefill first, prefix caching off), for
the prefill rate of issue 10 goal 3; prefills run eagerly in both modes, so ``--modes eager`` suffices.
``--host-top N``: also run each case once more under cProfile and list the N Python functions with the most
own (host) time per step - where an eager step's host time goes; a device sync shows as the own time of
``item`` / ``tolist`` / ``cpu`` / ``synchronize`` (the host waiting for the GPU).
    (--preset tiny on a CPU: a smoke run; it lists CPU operators instead of kernels)
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import pstats
import sys
import time
from collections import defaultdict
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_decode import PRESETS, exit_on_sigterm, build_model_and_adapters, random_prompts  # noqa: E402
from decode_variants import add_variant_flags, apply_variant_flags  # noqa: E402

_WARM_STEPS = 2


def _is_gpu_event(evt) -> bool:
    return evt.device_type == torch.autograd.DeviceType.CUDA


def _prefill(engine, prompts, loras, steps: int, prof_ctx=None) -> tuple[list[str], float, int]:
    """Add the requests and run their prefill steps (inside ``prof_ctx`` when given): the request ids, host
    seconds per prefill step and the number of prefill steps."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + _WARM_STEPS + 4, ignore_eos=True)
    ids = [f"profile-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, prompt, lora in zip(ids, prompts, loras or [None] * len(prompts)):
        engine.add_request(rid, prompt, params, lora_request=lora)
    produced = dict.fromkeys(ids, 0)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    n, start = 0, time.perf_counter()
    with prof_ctx if prof_ctx is not None else contextlib.nullcontext():
        while min(produced.values()) == 0:  # prefill steps (all the prompts, maybe in several chunks)
            with torch.profiler.record_function("prefill_step"):
                for out in engine.step():
                    produced[out.request_id] = len(out.outputs[0].token_ids)
            n += 1
        sync()
    return ids, (time.perf_counter() - start) / max(n, 1), n


def _drive_prefill(engine, prompts, loras, prof_ctx) -> tuple[float, int]:
    """One unprofiled prefill of the batch (compiles, warms the caches), then the same prompts again inside
    ``prof_ctx``: host seconds per prefill step and the steps it took (prefix caching is off)."""
    ids, _, _ = _prefill(engine, prompts, loras, 0)
    engine.abort_request(ids)
    ids, host, n = _prefill(engine, prompts, loras, 0, prof_ctx)
    engine.abort_request(ids)
    return host, n


def _drive(engine, prompts, loras, steps: int, prof_ctx) -> float:
    """Prefill, warm up, then ``steps`` decode steps inside ``prof_ctx``; host seconds per profiled step."""
    ids, _, _ = _prefill(engine, prompts, loras, steps)
    for _ in range(_WARM_STEPS):
        engine.step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    with prof_ctx:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.profiler.record_function("decode_step"):
                engine.step()
        sync()
        host = (time.perf_counter() - start) / steps
    engine.abort_request(ids)
    return host


def _summarise(prof, steps: int, top: int) -> tuple[str, dict]:
    """Markdown lines of the top kernels (or CPU ops without a GPU) and the per-step totals."""
    gpu = torch.cuda.is_available()
    per_name: dict[str, list[float]] = defaultdict(list)
    for evt in prof.events():
        if gpu:
            if not _is_gpu_event(evt):
                continue
        elif not evt.name.startswith("aten::") or (evt.cpu_parent is not None
                                                   and evt.cpu_parent.name.startswith("aten::")):
            continue  # CPU smoke run: the outermost aten operators
        per_name[evt.name].append(evt.time_range.elapsed_us())
    count = sum(len(v) for v in per_name.values())
    busy = sum(sum(v) for v in per_name.values())
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    what = "kernel" if gpu else "CPU operator (top level)"
    lines = [f"| {what} | calls / step | us / call | us / step | share |", "|---|---:|---:|---:|---:|"]
    for name, times in rows:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {len(times) / steps:.1f} | {sum(times) / len(times):.2f} | "
                     f"{sum(times) / steps:.1f} | {100 * sum(times) / max(busy, 1e-9):.1f} % |")
    return "\n".join(lines), {"launches": count / steps, "busy_us": busy / steps}


def _host_table(hp: cProfile.Profile, steps: int, top: int) -> str:
    """Markdown lines of the ``top`` functions by own host time per step (cProfile)."""
    stats = pstats.Stats(hp).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    total = sum(v[2] for v in stats.values())
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    lines = [f"host: {total / steps * 1e3:.2f} ms of Python own time / step (cProfile; its overhead included)", "",
             "| function | calls / step | own us / step | cumulative us / step |", "|---|---:|---:|---:|"]
    for (file, line, name), (_, calls, own, cum, _) in rows:
        where = name if file == "~" else f"{os.path.relpath(file) if file.startswith(os.getcwd()) else os.path.basename(file)}:{line} {name}"
        where = where if len(where) <= 100 else "..." + where[-97:]
        lines.append(f"| `{where.replace('|', '/')}` | {calls / steps:.1f} | {own / steps * 1e6:.0f} | "
                     f"{cum / steps * 1e6:.0f} |")
    return "\n".join(lines)


def _engine(model_dir: str, common: dict, **kw):
    from vllm import LLM

    return LLM(model_dir, **common, **kw)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--steps", type=int, default=8, help="profiled decode steps per case")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--modes", default="eager,graphs", help="eager and/or graphs (graphs: CUDA only)")
    p.add_argument("--top", type=int, default=25, help="kernels listed per case")
    p.add_argument("--trace-dir", default=None, help="also export a Chrome trace per case here")
    p.add_argument("--prefill", action="store_true",
                   help="profile the batch's prefill steps (after one unprofiled prefill) instead of decode steps")
    p.add_argument("--host-top", type=int, default=0,
                   help="also list the N functions with the most host time per step (one more run under cProfile)")
    add_variant_flags(p)
    p.add_argument("--out", default=None, help="write the markdown report here")
    a = p.parse_args(argv)
    variants_on = apply_variant_flags(a)
    for k, v in PRESETS[a.preset].items():
        setattr(a, k, v)
    batches = [int(x) for x in a.batches.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    cuda = torch.cuda.is_available()
    if not cuda:
        modes = [m for m in modes if m != "graphs"] or ["eager"]
    model_dir, adapters = build_model_and_adapters(a, "profile_decode_")
    top_b = max(batches)
    prompts = random_prompts(a, top_b)
    max_len = a.prompt_len + a.steps + _WARM_STEPS + 16
    common = dict(dtype=a.dtype, max_model_len=max_len, max_num_seqs=top_b,
                  num_gpu_blocks_override=top_b * (-(-max_len // 16)) + 64, cuda_graph_sizes=batches,
                  enable_prefix_caching=False)  # the runs repeat their prompts: time computing them
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    what = "prefill steps of the batch (after one unprofiled prefill)" if a.prefill else \
        f"{a.steps} profiled decode steps"
    report = [f"# {'Prefill' if a.prefill else 'Decode'} profile: {gpu}, {a.dtype}; {a.preset} width, {a.layers} "
              f"layers; prompts of {a.prompt_len} tokens; {what} per case; LoRA: {a.num_loras} adapters of "
              f"rank {a.rank} spread over the batch; switches on: {', '.join(variants_on) or 'none'}", ""]
    unit = "GPU ops" if cuda else "CPU ops"
    summary = [f"| mode | LoRA | batch | {unit} (GPU: kernels + copies) / step | busy (sum of op times) / step | host wall / step |",
               "|---|---|---:|---:|---:|---:|"]
    details = []
    for mode in modes:
        for lora in (False, True):
            kw = dict(enforce_eager=(mode == "eager"), async_scheduling=False)  # one step per profiled range
            if lora:
                kw.update(enable_lora=True, max_loras=a.num_loras, max_lora_rank=2 * a.rank)
            llm = _engine(model_dir, common, **kw)
            for b in batches:
                loras = [adapters[i % a.num_loras] for i in range(b)] if lora else None
                prof = torch.profiler.profile(activities=activities)
                if a.prefill:
                    host, n = _drive_prefill(llm.llm_engine, prompts[:b], loras, prof)
                else:
                    host, n = _drive(llm.llm_engine, prompts[:b], loras, a.steps, prof), a.steps
                table, tot = _summarise(prof, n, a.top)
                name = f"{mode}, {'LoRA' if lora else 'no LoRA'}, {'prefill of ' if a.prefill else ''}batch {b}"
                if a.trace_dir:
                    os.makedirs(a.trace_dir, exist_ok=True)
                    prof.export_chrome_trace(os.path.join(a.trace_dir, name.replace(", ", "_").replace(" ", "") + ".json"))
                summary.append(f"| {mode} | {'yes' if lora else 'no'} | {b} | {tot['launches']:.0f} | "
                               f"{tot['busy_us'] / 1e3:.2f} ms | {host * 1e3:.2f} ms |")
                details += [f"## {name}", "", f"{tot['launches']:.0f} {unit} / step, busy "
                            f"{tot['busy_us'] / 1e3:.2f} ms / step, host wall {host * 1e3:.2f} ms / step", "", table, ""]
                if a.host_top > 0:
                    hp = cProfile.Profile()
                    if a.prefill:
                        _, hn = _drive_prefill(llm.llm_engine, prompts[:b], loras, hp)
                    else:
                        hn = a.steps
                        _drive(llm.llm_engine, prompts[:b], loras, a.steps, hp)
                    details += [_host_table(hp, hn, a.host_top), ""]
                print(f"  {name}: {tot['launches']:.0f} {unit}/step, busy {tot['busy_us'] / 1e3:.2f} ms, "
                      f"wall {host * 1e3:.2f} ms", flush=True)
            llm.llm_engine.shutdown()
            del llm
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    text = "\n".join(report + summary + [""] + details)
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    exit_on_sigterm()  # a timeout still removes the scratch checkpoint
    sys.exit(main())
