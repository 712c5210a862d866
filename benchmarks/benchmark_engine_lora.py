"""End-to-end generation throughput of ``LLM`` on a random MoE model: without LoRA, with LoRA
enabled but a base-only batch, and with every request on one of several adapters.

The model is a random Qwen3-MoE-shaped checkpoint made here with transformers
(default: 4 layers, hidden 1024, 64 experts, top-8, expert width 384, vocab
32000; about 1.3 GB in bf16), and ``--num-loras`` random PEFT adapters on the
attention projections and the fused experts.

Correctness first: greedy token ids of the LoRA-enabled engine on a base-only
batch must equal the LoRA-disabled engine's (layers whose adapters no token
uses launch nothing, so the kernels are the same), and the adapters must change
the output.  Then each case generates ``--gen`` tokens for ``--batch`` prompts
of ``--prompt-len`` tokens (``ignore_eos``), after an identical warm-up run
(Triton compiles each new kernel shape on first use), best of 3 runs; the
table gives wall time, output tokens/s and the ratio to the no-LoRA case.

    PYTHONPATH=. python benchmarks/benchmark_engine_lora.py [--batch 64] [--gen 64] [--tp 1]
        [--small]   (a tiny model, for a CPU smoke run)
"""
from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings

import torch


def scratch_dir(prefix: str) -> str:
    """A new temporary folder for a benchmark's random checkpoint and adapters (tens of GB at real width),
    removed when the process exits; each script's ``__main__`` block calls ``exit_on_sigterm`` so that a
    timeout's SIGTERM removes it too (not from here: a test process keeps its own SIGTERM handling)."""
    work = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, work, True)
    return work


def exit_on_sigterm() -> None:
    """SIGTERM (what ``timeout`` sends) exits through ``sys.exit``, so the ``atexit`` clean-ups run; a handler
    already installed is kept."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def make_model_dir(folder: str, args, device: str = "cpu") -> torch.nn.Module:
    """Save a random Qwen3-MoE checkpoint of ``args``' widths (``args.head_dim``, default 128) and a
    word-level tokenizer in ``folder``.  On a GPU ``device`` the weights are drawn there, directly in
    ``args.dtype`` (a model of a real width builds in seconds instead of minutes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                               head_dim=getattr(args, "head_dim", 128),
                               vocab_size=args.vocab, intermediate_size=4 * args.hidden, num_experts=args.experts,
                               num_experts_per_tok=args.topk, moe_intermediate_size=args.moe_inter,
                               norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
                               eos_token_id=1, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    if device == "cpu":
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(getattr(torch, args.dtype))
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t0").save_pretrained(folder)
    return model


def make_adapter(hf: torch.nn.Module, folder: str, rank: int, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(hf), LoraConfig(
            r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        peft.save_pretrained(folder)
    return folder


def run(llm, prompts, params, loras, reps: int = 3) -> tuple[float, list[list[int]]]:
    """Best of ``reps`` timed runs after a warm-up run (the first engine of a process also pays
    for the allocator's growth: a single timed run made the first case look slowest)."""
    llm.generate(prompts, params, lora_request=loras, use_tqdm=False)  # warm-up: every kernel shape compiled
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), [o.outputs[0].token_ids for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--small", action="store_true", help="a tiny model (CPU smoke run)")
    args = p.parse_args()
    dims = dict(hidden=1024, layers=4, heads=16, kv_heads=4, vocab=32000, experts=64, topk=8, moe_inter=384)
    if args.small:
        dims = dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=256, experts=8, topk=2, moe_inter=32)
        args.batch, args.prompt_len, args.gen = min(args.batch, 4), min(args.prompt_len, 8), min(args.gen, 4)
    for k, v in dims.items():
        setattr(args, k, v)

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    work = scratch_dir("bench_engine_lora_")
    model_dir = os.path.join(work, "model")
    hf = make_model_dir(model_dir, args)
    # max_lora_rank 2r: room for a two-slice adapter in a one-slice (gpt-oss) layer; peft's fused gate_up is rank r
    adapters = [LoRARequest(f"a{i}", i + 1, make_adapter(hf, os.path.join(work, f"a{i}"), args.rank, 10 + i))
                for i in range(args.num_loras)]
    del hf
    gen = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(2, args.vocab, (args.prompt_len,), generator=gen).tolist()}
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.gen, ignore_eos=True)
    common = dict(dtype=args.dtype, max_model_len=args.prompt_len + args.gen + 8, tensor_parallel_size=args.tp,
                  max_num_seqs=max(args.batch, 1))
    if not torch.cuda.is_available():
        common["num_gpu_blocks_override"] = 4 * args.batch * (common["max_model_len"] // 16 + 1)

    rows = []
    llm = LLM(model_dir, **common)
    t_base, base_tokens = run(llm, prompts, params, None)
    rows.append(("no LoRA", t_base))
    llm.llm_engine.shutdown()
    del llm
    llm = LLM(model_dir, enable_lora=True, max_loras=args.num_loras, max_lora_rank=2 * args.rank, **common)
    t_off, off_tokens = run(llm, prompts, params, None)
    assert off_tokens == base_tokens, "LoRA enabled, base-only batch: tokens differ from the engine without LoRA"
    rows.append(("LoRA on, base-only batch", t_off))
    loras = [adapters[i % args.num_loras] for i in range(args.batch)]
    t_on, on_tokens = run(llm, prompts, params, loras)
    assert on_tokens != base_tokens, "the adapters did not change any output"
    rows.append((f"LoRA on, {args.num_loras} adapters (rank {args.rank}) over the batch", t_on))
    llm.llm_engine.shutdown()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device} x{args.tp}, {args.dtype}; model: {args.layers} layers, hidden {args.hidden}, "
          f"{args.experts} experts top-{args.topk} (width {args.moe_inter}), vocab {args.vocab}; "
          f"batch {args.batch} x ({args.prompt_len} prompt + {args.gen} generated tokens)\n")
    print("| case | time (s) | output tokens/s | time / no-LoRA |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {args.batch * args.gen / t:.0f} | {t / t_base:.2f} |")


if __name__ == "__main__":
    exit_on_sigterm()  # a timeout still removes the scratch checkpoint
    main()
