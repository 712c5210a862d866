"""Decode step time of ``LLM.generate`` at a real MoE width: eager vs CUDA graphs, without LoRA and
with 4 adapters, against the step's memory roofline (issue 10).

The checkpoint is random, of one model's width (``--preset``), ``--layers`` of its layers (default
12; per-step time scales with it), built with transformers on the GPU (``benchmark_engine_lora``'s
helpers, which also make the ``--num-loras`` random PEFT adapters of rank ``--rank`` on q/k/v/o and
the fused experts; max_lora_rank is 2 x rank, room for per-expert adapters in a one-slice layer):

    qwen3-30b-a3b  hidden 2048, 32 q / 4 kv heads of 128, 128 experts top-8 of width 768, vocab 151936
    mixtral-8x7b   hidden 4096, 32 q / 8 kv heads of 128, 8 experts top-2 of width 14336, vocab 32000
    gpt-oss-20b    hidden 2880, 64 q / 8 kv heads of 64, 32 experts top-4 of width 2880, vocab 201088

All are built as Qwen3-MoE (SiLU-gated bf16 experts, q/k norms): Mixtral's and gpt-oss's widths with
an architecture the engine supports (gpt-oss's MXFP4 experts, biases, sinks and sliding window are
not modelled).

Correctness first: greedy tokens with graphs equal the eager engine's, without and with LoRA, and the
LoRA-enabled engine on a base-only batch equals the engine without LoRA (a mismatch is reported and
the exit status is 1, after the table).  Then, per batch size (default 1, 16, 64, 256), prompts of
``--prompt-len`` random tokens: decode step = the time of 32 engine steps of the whole batch in decode
(``steady_decode``: timed once every request has decoded, none finishing inside) / 32, best of
``--repeats`` (3) after a warm-up.  The roofline step reads, per layer, the attention weights, the expected
distinct experts of the batch x bytes per expert, the router and the KV cache (context = prompt +
half the decode), plus the LM head once, at the copy bandwidth measured here (or ``--bandwidth``).

With ``--async-scheduling`` two more engines run with graphs and ``async_scheduling=True`` (decode step
n+1 queued before step n's tokens are read): their tokens must equal the synchronous graph engines',
and their step times, LoRA / no LoRA and % of the roofline are four more columns (async is the engine's
default on a GPU: those are the figures the goals are read from).

    PYTHONPATH=. python benchmarks/benchmark_decode.py [--preset qwen3-30b-a3b] [--layers 12]
        [--batches 1,16,64,256] [--async-scheduling] [--dense-gemv-max-tokens N] [--dense-gemv-delayed]
        [--moe-fused-activation] [--fused-kv-write] [--all-fusions]
        [--tp N [--enable-expert-parallel]] [--out decode.md]
        (--preset tiny: a CPU smoke run)
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_engine_lora import exit_on_sigterm, make_adapter, make_model_dir, scratch_dir  # noqa: E402
from decode_variants import add_variant_flags, apply_variant_flags  # noqa: E402

PRESETS = {
    "qwen3-30b-a3b": dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, topk=8, moe_inter=768,
                          vocab=151936),
    "mixtral-8x7b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, experts=8, topk=2, moe_inter=14336,
                         vocab=32000),
    "gpt-oss-20b": dict(hidden=2880, heads=64, kv_heads=8, head_dim=64, experts=32, topk=4, moe_inter=2880,
                        vocab=201088),
    "tiny": dict(hidden=64, heads=4, kv_heads=2, head_dim=16, experts=8, topk=2, moe_inter=32, vocab=256),
}
H200_COPY_BANDWIDTH = 4.24e12


def roofline_bytes(a, batch: int, context: int) -> float:
    """Bytes one decode step must read (bf16), FACTS.md section 9."""
    h, d = a.hidden, a.head_dim
    attn = h * (a.heads + 2 * a.kv_heads) * d + a.heads * d * h
    distinct = a.experts * (1 - (1 - a.topk / a.experts) ** batch)
    experts = distinct * 3 * h * a.moe_inter
    kv = batch * context * 2 * a.kv_heads * d
    return 2.0 * (a.layers * (attn + experts + a.experts * h + kv) + a.vocab * h)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return bw


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(llm, prompts, gen: int, loras) -> tuple[float, list[list[int]]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    _sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    _sync()
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs]


def build_model_and_adapters(a, prefix: str) -> tuple[str, list]:
    """A random checkpoint of ``a``'s width and ``a.num_loras`` random PEFT adapters of rank ``a.rank``
    in a new temporary folder, removed at exit (built on the GPU when there is one): (model dir, LoRARequests)."""
    from vllm.lora.request import LoRARequest

    cuda = torch.cuda.is_available()
    work = scratch_dir(prefix)
    model_dir = os.path.join(work, "model")
    t0 = time.perf_counter()
    hf = make_model_dir(model_dir, a, device="cuda" if cuda else "cpu")
    adapters = [LoRARequest(f"a{i}", i + 1, make_adapter(hf, os.path.join(work, f"a{i}"), a.rank, 10 + i))
                for i in range(a.num_loras)]
    del hf
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"{a.preset} x {a.layers} layers and {a.num_loras} adapters built in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return model_dir, adapters


def random_prompts(a, n: int) -> list[dict]:
    """``n`` prompts of ``a.prompt_len`` random token ids (seeded)."""
    gen = torch.Generator().manual_seed(1)
    return [{"prompt_token_ids": torch.randint(2, a.vocab, (a.prompt_len,), generator=gen).tolist()}
            for _ in range(n)]


REPEATS = 3  # timed runs per case (``--repeats``): the minimum of each is taken


_request_ids = itertools.count()


def steady_decode(llm, prompts, loras, steps: int) -> tuple[float, list[list[int]]]:
    """(seconds of ``steps`` engine steps of the whole batch in decode, greedy tokens).  The window opens once
    every request has two output tokens on the host (its prefill and first decode step are behind it) and
    closes after ``steps`` more ``LLMEngine.step`` calls, each between device synchronisations; the requests ask
    for ``steps + 4`` tokens (final outputs only, as ``LLM.generate``), so none finishes inside it."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    per = loras if isinstance(loras, list) else [loras] * len(prompts)
    ids = [f"steady-{next(_request_ids)}" for _ in prompts]
    for rid, prompt, lora in zip(ids, prompts, per):
        engine.add_request(rid, prompt, params, lora_request=lora)
    done: dict[str, object] = {}

    def pump() -> None:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out

    def fewest_outputs() -> int:
        return min(seqs[0].num_output_tokens for seqs in (engine._requests[r] for r in ids))

    while fewest_outputs() < 2:
        pump()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        pump()
    _sync()
    seconds = time.perf_counter() - start
    while engine.has_unfinished_requests():
        pump()
    return seconds, [list(done[r].outputs[0].token_ids) for r in ids]


def decode_step(llm, prompts, loras, steps: int) -> tuple[float, float, list[list[int]]]:
    """(seconds per decode step, seconds of the prefill, greedy tokens): decode = the best of ``REPEATS``
    ``steady_decode`` windows / steps, after a warm-up; prefill = best t(1) (the whole batch's prompts and one
    sample).  (Before the twenty-third session decode was (best t(steps + 1) - best t(1)) / steps: the
    prefill's own spread, up to ~10 ms at batch 1 on an H200, leaked into it.)"""
    steady_decode(llm, prompts, loras, steps)
    windows, prefills, tokens = [], [], None
    for _ in range(REPEATS):
        t, tokens = steady_decode(llm, prompts, loras, steps)
        windows.append(t)
        prefills.append(timed(llm, prompts, 1, loras)[0])
    return min(windows) / steps, min(prefills), tokens


def prefill_flops(a, batch: int) -> float:
    """Model FLOPs of prefilling ``batch`` prompts of a.prompt_len tokens (matmuls and causal attention;
    the LM head only for each prompt's last token, as the engine computes it)."""
    h, d, t = a.hidden, a.head_dim, a.prompt_len
    per_token = 2 * (h * (a.heads + 2 * a.kv_heads) * d + a.heads * d * h + a.topk * 3 * h * a.moe_inter
                     + a.experts * h)
    attention = 2 * 2 * a.heads * d * t * (t + 1) / 2  # QK^T and PV over the causal half, per prompt and layer
    return a.layers * (batch * t * per_token + batch * attention) + batch * 2 * a.vocab * h


def matmul_rate(dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """The card's dense matmul rate (FLOP/s): best of a few n x n x n products."""
    x = torch.randn(n, n, device="cuda", dtype=dtype)
    y = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        x @ y
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x @ y
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * n**3 / best


def run_engine(model_dir: str, common: dict, batches: list[int], prompts, loras_for, steps: int,
               base_only: Optional[int] = None, **kw) -> tuple[dict[int, float], dict[int, list]]:
    """Step times and tokens per batch size; with ``base_only`` = b, tokens[-b] are those of a batch
    of b prompts without adapters."""
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model_dir, **{**common, **kw})
    graphs = llm.llm_engine.runner.graphs
    print(f"  engine {kw}: ready in {time.perf_counter() - t0:.1f} s, "
          f"{llm.llm_engine.scheduler.config.max_num_batched_tokens} tokens a step"
          + (f" (graphs: {len(graphs.replays)} in {graphs.capture_seconds:.1f} s, "
             f"{graphs.graph_memory_bytes / 2**20:.0f} MiB)" if graphs is not None else " (eager)"), flush=True)
    times, tokens = {}, {}
    for b in batches:
        times[b], times[("prefill", b)], tokens[b] = decode_step(llm, prompts[:b], loras_for(b), steps)
        print(f"    batch {b}: {times[b] * 1e3:.2f} ms/step, prefill {times[('prefill', b)] * 1e3:.1f} ms", flush=True)
    if base_only:
        tokens[-base_only] = steady_decode(llm, prompts[:base_only], None, steps)[1]
    if graphs is not None:
        assert any(graphs.replays.values()), "the graph engine never replayed a graph"
    llm.llm_engine.shutdown()
    del llm, graphs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return times, tokens


def compare(name: str, got: dict, want: dict, problems: list[str]) -> None:
    for b in want:
        bad = sum(g != w for g, w in zip(got[b], want[b]))
        if bad:
            problems.append(f"{name}: batch {b}: {bad} of {b} sequences differ")
    print(f"  check {name}: {'OK' if not any(p.startswith(name) for p in problems) else 'MISMATCH'}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed (each request generates steps + 4 tokens)")
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--bandwidth", type=float, default=None, help="copy bandwidth in B/s (default: measured)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="also time the graph engines with async scheduling (tokens checked against the sync ones)")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (the roofline is then per GPU: the "
                   "step's bytes split over the ranks; CUDA graphs are off with TP > 1, both columns run eagerly)")
    p.add_argument("--enable-expert-parallel", action="store_true", help="with --tp: whole experts per rank")
    p.add_argument("--repeats", type=int, default=REPEATS,
                   help="timed runs per case, best taken (2 before 2026-12-02; H200 runs of the same code had "
                        "varied by up to 15 %% at batch 1 with 2)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="the engines' step size (default: the engine's, 16384 for LLM on a GPU of >= 70 GiB)")
    add_variant_flags(p)
    p.add_argument("--out", default=None, help="write the markdown table here")
    a = p.parse_args(argv)
    variants_on = apply_variant_flags(a)
    globals()["REPEATS"] = max(1, a.repeats)  # read by decode_step
    for k, v in PRESETS[a.preset].items():
        setattr(a, k, v)
    batches = [int(x) for x in a.batches.split(",")]
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    bandwidth = a.bandwidth or (copy_bandwidth() if cuda else H200_COPY_BANDWIDTH)

    model_dir, adapters = build_model_and_adapters(a, "bench_decode_")
    top = max(batches)
    prompts = random_prompts(a, top)
    max_len = a.prompt_len + a.steps + 8
    blocks = top * (-(-max_len // 16)) + 64
    common = dict(dtype=a.dtype, max_model_len=max_len, max_num_seqs=top, num_gpu_blocks_override=blocks,
                  cuda_graph_sizes=batches, tensor_parallel_size=a.tp, enable_expert_parallel=a.enable_expert_parallel,
                  enable_prefix_caching=False,  # the runs repeat their prompts: time computing them
                  async_scheduling=False)  # the sync columns (on a GPU the engine's default is async)
    if a.max_num_batched_tokens:
        common["max_num_batched_tokens"] = a.max_num_batched_tokens
    lora_kw = dict(enable_lora=True, max_loras=a.num_loras, max_lora_rank=2 * a.rank)
    no_lora = lambda b: None  # noqa: E731
    spread = lambda b: [adapters[i % a.num_loras] for i in range(b)]  # noqa: E731

    problems: list[str] = []
    eager_base, tok_eager = run_engine(model_dir, common, batches, prompts, no_lora, a.steps, enforce_eager=True)
    graph_base, tok_graph = run_engine(model_dir, common, batches, prompts, no_lora, a.steps)
    compare("graphs vs eager, no LoRA", tok_graph, tok_eager, problems)
    b0 = batches[min(1, len(batches) - 1)]
    graph_lora, tok_glora = run_engine(model_dir, common, batches, prompts, spread, a.steps, base_only=b0,
                                       **lora_kw)
    eager_lora, tok_elora = run_engine(model_dir, common, batches, prompts, spread, a.steps, enforce_eager=True,
                                       **lora_kw)
    compare("graphs vs eager, LoRA", {b: tok_glora[b] for b in batches}, tok_elora, problems)
    if all(tok_glora[b] == tok_graph[b] for b in batches):
        problems.append("the adapters did not change any output")
    # the LoRA-enabled engine on a base-only batch (one size: a correctness check) vs the engine without LoRA
    compare("LoRA-enabled base-only vs LoRA-disabled", {b0: tok_glora[-b0]}, {b0: tok_graph[b0]}, problems)
    if a.async_scheduling:
        async_base, tok_abase = run_engine(model_dir, common, batches, prompts, no_lora, a.steps,
                                           async_scheduling=True)
        compare("async vs sync scheduling, no LoRA", tok_abase, tok_graph, problems)
        async_lora, tok_alora = run_engine(model_dir, common, batches, prompts, spread, a.steps,
                                           async_scheduling=True, **lora_kw)
        compare("async vs sync scheduling, LoRA", tok_alora, {b: tok_glora[b] for b in batches}, problems)

    context = a.prompt_len + a.steps // 2
    par = "" if a.tp == 1 else f"; {a.tp} ranks ({'expert' if a.enable_expert_parallel else 'tensor'} parallel)"
    lines = [f"{gpu}{par}, {a.dtype}; {a.preset} width, {a.layers} layers; prompts of {a.prompt_len} tokens; "
             f"{a.num_loras} adapters of rank {a.rank} (q/k/v/o + experts) spread over the batch; copy bandwidth "
             f"{bandwidth / 1e12:.2f} TB/s{'' if a.bandwidth is None else ' (given)'}; switches on: "
             f"{', '.join(variants_on) or 'none'}", "",
             "| batch | eager, no LoRA | graphs, no LoRA | eager, LoRA | graphs, LoRA | LoRA / no LoRA (graphs) "
             "| tokens/s (graphs, no LoRA) | roofline step | % of roofline (graphs, no LoRA) |"
             + (" graphs + async, no LoRA | graphs + async, LoRA | LoRA / no LoRA (async) "
                "| % of roofline (async, no LoRA) |" if a.async_scheduling else ""),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|" if a.async_scheduling else "")]
    for b in batches:
        roof = roofline_bytes(a, b, context) / (bandwidth * a.tp)  # each rank reads its share
        g = graph_base[b]
        lines.append(f"| {b} | {eager_base[b] * 1e3:.2f} ms | {g * 1e3:.2f} ms | {eager_lora[b] * 1e3:.2f} ms | "
                     f"{graph_lora[b] * 1e3:.2f} ms | {graph_lora[b] / g:.2f} | {b / g:.0f} | {roof * 1e3:.2f} ms | "
                     f"{100 * roof / g:.0f} % |"
                     + (f" {async_base[b] * 1e3:.2f} ms | {async_lora[b] * 1e3:.2f} ms | "
                        f"{async_lora[b] / async_base[b]:.2f} | {100 * roof / async_base[b]:.0f} % |"
                        if a.async_scheduling else ""))
    top_b = max(batches)
    flops = prefill_flops(a, top_b)
    rate = matmul_rate(getattr(torch, a.dtype)) if cuda else float("nan")
    runs = [("no LoRA", graph_base), ("LoRA", graph_lora)]
    if a.async_scheduling:  # (the engine's default on one GPU: prefill steps queued back to back)
        runs += [("no LoRA, async scheduling", async_base), ("LoRA, async scheduling", async_lora)]
    for name, times in runs:
        t = times[("prefill", top_b)]
        lines.append(f"\nPrefill of {top_b} x {a.prompt_len} tokens ({name}): {t * 1e3:.1f} ms, "
                     f"{flops / t / 1e12:.1f} TFLOP/s = {100 * flops / t / rate:.0f} % of the measured {a.dtype} "
                     f"matmul rate ({rate / 1e12:.0f} TFLOP/s)")
    lines += ["", "Correctness: " + ("greedy tokens identical (graphs vs eager, with and without LoRA; "
                                     "LoRA-enabled base-only vs LoRA-disabled)" if not problems
                                     else "; ".join(problems))]
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    exit_on_sigterm()  # a timeout still removes the scratch checkpoint
    sys.exit(main())
