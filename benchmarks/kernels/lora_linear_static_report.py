"""Static report of the dense LoRA token kernels compiled for an H100 / H200 (sm_90), no GPU needed.

Per token kernel (``LoRALinearTileConfig.token_kernel`` 0 = ``lora_linear_token_kernel``, 1 =
``lora_linear_token_prefetch_kernel``, 2 = the split-K shrink + expand: two figures each, "shrink/expand",
round trips "shrink + expand") at the configs ``lora_linear_config`` / ``token_variant_config`` /
``split_variant_config`` give for the attention projections (qkv: three slices in one launch; o: one),
as the engine launches them (slices are views of one buffer, ``adapter_enabled`` given): registers,
spilled bytes, shared memory,
programs, bytes of A the programs read (each program reads its slot's whole A), and the dependent
global-memory round trips before the last store (``round_trips``).

``round_trips``: ``sass_round_trips.py`` (one warp issuing in order; a global load's result is ready
one round trip after it issues).

    PYTHONPATH=. python benchmarks/kernels/lora_linear_static_report.py [--width qwen3] [--rank 16] [--tokens 1 8]
        [--moe] [--moe-widths qwen3 mixtral gpt-oss] [--out report.md]

``--moe`` adds the MoE LoRA pair kernel (``moe_lora_pair_kernel``, the small-batch path of the w13 / w2
LoRA) at one token, its heuristic tiles (and the tiles before ``moe_lora_config.WIDE_RANK_PAIR_TILES`` where
they differ), as the engine launches it, at the ``--moe-widths`` (qwen3, mixtral, gpt-oss).

Run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET (the interpreter replaces the compiler)")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.kernels.sass_round_trips import round_trips  # noqa: E402
from benchmarks.kernels.sass_stats import TARGET, _sass, resources, specialise  # noqa: E402

_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# width -> (hidden, q heads * head_dim, kv heads * head_dim), as benchmark_lora_linear.py
WIDTHS = {"qwen3": (2048, 4096, 512), "mixtral": (4096, 4096, 1024), "gpt-oss": (2880, 4096, 512)}
def compile_token(kernel: int, dtype: torch.dtype, cfg, *, K: int, n_sizes: list[int], R: int, L: int = 4):
    """One token-path kernel as the engine launches it (``add_lora_linear``'s arguments)."""
    from vllm.lora.ops.triton_ops import _lora_linear_kernels as kern
    from vllm.triton_utils import next_power_of_2

    fn = kern.lora_linear_token_kernel if kernel == 0 else kern.lora_linear_token_prefetch_kernel
    S, maxN, dt = len(n_sizes), max(n_sizes), _DT[dtype]
    n = n_sizes + [0] * (3 - S)
    offs = [sum(n_sizes[:i]) for i in range(S)] + [0] * (3 - S)
    ptrs = dict(x_ptr=dt, a_ptr=dt, b_ptr=dt, y_ptr=dt, mapping_ptr="i32", enabled_ptr="i32")
    ints = dict(K=K, R=R, max_loras=L, n0=n[0], n1=n[1], n2=n[2], off0=offs[0], off1=offs[1], off2=offs[2],
                stride_xt=K, stride_xk=1, stride_as=L * R * K if S > 1 else 0, stride_al=R * K, stride_ar=K,
                stride_ak=1, stride_bs=L * maxN * R if S > 1 else 0, stride_bl=maxN * R, stride_bn=R, stride_br=1,
                stride_yt=sum(n_sizes), stride_yn=1)
    if kernel == 0:
        ints["num_n_splits"] = max(1, min(cfg.num_n_splits, -(-maxN // cfg.block_n)))
    cexp = dict(HAS_ENABLED=True, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=next_power_of_2(max(R, 8)),
                K_TILES=-(-K // cfg.block_k))
    return triton.compile(specialise(fn, ptrs, cexp, ints), target=TARGET,
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def compile_split(dtype: torch.dtype, cfg, *, K: int, n_sizes: list[int], R: int, L: int = 4):
    """The split-K pair (``token_kernel=2``): (shrink, expand) as the engine launches them."""
    from vllm.lora.ops.triton_ops import _lora_linear_split_kernels as split
    from vllm.triton_utils import next_power_of_2

    S, maxN, dt = len(n_sizes), max(n_sizes), _DT[dtype]
    block_r, ks = next_power_of_2(max(R, 8)), -(-K // cfg.block_k)
    n = n_sizes + [0] * (3 - S)
    offs = [sum(n_sizes[:i]) for i in range(S)] + [0] * (3 - S)
    part = dict(stride_pt=S * ks * block_r, stride_ps=ks * block_r, stride_pj=block_r)
    opts = dict(num_warps=cfg.num_warps, num_stages=1)
    shrink = specialise(split.lora_linear_split_shrink_kernel,
                        dict(x_ptr=dt, a_ptr=dt, part_ptr="fp32", mapping_ptr="i32"),
                        dict(BLOCK_K=cfg.block_k, BLOCK_R=block_r),
                        dict(K=K, R=R, max_loras=L, stride_xt=K, stride_xk=1, stride_as=L * R * K if S > 1 else 0,
                             stride_al=R * K, stride_ar=K, stride_ak=1, **part))
    expand = specialise(split.lora_linear_split_expand_kernel,
                        dict(part_ptr="fp32", b_ptr=dt, y_ptr=dt, mapping_ptr="i32", enabled_ptr="i32"),
                        dict(HAS_ENABLED=True, BLOCK_N=cfg.block_n, BLOCK_R=block_r, BLOCK_J=next_power_of_2(ks)),
                        dict(R=R, max_loras=L, k_splits=ks, n0=n[0], n1=n[1], n2=n[2], off0=offs[0], off1=offs[1],
                             off2=offs[2], stride_bs=L * maxN * R if S > 1 else 0, stride_bl=maxN * R, stride_bn=R,
                             stride_br=1, stride_yt=sum(n_sizes), stride_yn=1, **part))
    return (triton.compile(shrink, target=TARGET, options=opts), triton.compile(expand, target=TARGET, options=opts))


def compile_pair(dtype: torch.dtype, cfg, *, K: int, N: int, R: int, S: int, top_k: int, E: int, w2: bool,
                 L: int = 4, prefetch: bool = False):
    """``moe_lora_pair_kernel`` (shrink and expand fused; ``prefetch``: ``moe_lora_pair_prefetch_kernel`` at
    its own tiles, ``cfg`` then holds them) as ``add_lora_w13`` / ``add_lora_w2`` launch it at one token: w13
    reads x [1, K] per pair (top_k_in = top_k), w2 the pair's row of the intermediate (top_k_in = 1) and
    multiplies by the router weight."""
    from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import moe_lora_pair_kernel
    from vllm.lora.ops.triton_ops._moe_lora_pair_prefetch_kernel import moe_lora_pair_prefetch_kernel
    from vllm.lora.ops.triton_ops.moe_lora_config import rank_block

    fn = moe_lora_pair_prefetch_kernel if prefetch else moe_lora_pair_kernel

    dt = _DT[dtype]
    ptrs = dict(x_ptr=dt, a_ptr=dt, b_ptr=dt, out_ptr=dt, shrunk_ptr=dt, w_ptr="fp32", topk_ids_ptr="i32",
                mapping_ptr="i32", enabled_ptr="i32", expert_map_ptr="i32")
    cols = N * S
    ints = dict(numel=top_k, top_k=top_k, top_k_in=1 if w2 else top_k, K=K, N=N, R=R, num_experts=E, max_loras=L,
                stride_xm=K, stride_xk=1, stride_as=L * E * R * K if S > 1 else 0, stride_al=E * R * K,
                stride_ae=R * K, stride_ar=K, stride_ak=1, stride_bs=L * E * N * R if S > 1 else 0,
                stride_bl=E * N * R, stride_be=N * R, stride_bn=R, stride_br=1, stride_ot=top_k * cols,
                stride_oj=cols, stride_on=1, out_col0=0, out_slice_cols=N, stride_ss=0, stride_sp=0, stride_sr=0,
                num_n_splits=max(1, min(cfg.num_n_splits, -(-N // cfg.block_size_n))))
    cexp = dict(HAS_EXPERT_MAP=False, DO_SHRINK=True, DO_EXPAND=True, MUL_ROUTED_WEIGHT=w2,
                BLOCK_N=cfg.block_size_n, BLOCK_K=cfg.block_size_k, BLOCK_R=rank_block(R),
                K_TILES=-(-K // cfg.block_size_k))
    return triton.compile(specialise(fn, ptrs, cexp, ints), target=TARGET,
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


MOE_WIDTHS = {"qwen3": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2), "gpt-oss": (2880, 2880, 32, 4)}


def pair_rows(width: str, rank: int, dtype: torch.dtype) -> list[str]:
    """``moe_lora_pair_kernel`` at one token (``MOE_WIDTHS``: H, I, experts, top-k): its heuristic tiles, the
    tiles before ``WIDE_RANK_PAIR_TILES`` where that switch changes them, and the prefetch kernel."""
    from vllm.lora.ops.triton_ops import moe_lora_config as mc
    from vllm.lora.ops.triton_ops.fused_moe_lora import pair_prefetch_tiles

    H, I, E, top_k = MOE_WIDTHS[width]
    rows = []
    for (name, K, N, S, w2), variant in itertools.product(
            (("w13 (gate, up)", H, I, 2, False), ("w2", I, H, 1, True)), ("pair", "pair, old tiles", "pair prefetch")):
        def config():
            return mc.get_moe_lora_config("fused_moe_lora", num_pairs=top_k, num_experts=E, max_loras=4, rank=rank,
                                          K=K, N=N, num_slices=S, dtype=dtype, use_tuned_config=False,
                                          device_name="cuda")
        cfg = config()
        if variant == "pair, old tiles":
            saved, mc.WIDE_RANK_PAIR_TILES = mc.WIDE_RANK_PAIR_TILES, False
            mc._cached_config.cache_clear()  # the configs are cached by shape
            try:
                old = config()
            finally:
                mc.WIDE_RANK_PAIR_TILES = saved
                mc._cached_config.cache_clear()
            if old == cfg:
                continue
            cfg = old
        if variant == "pair prefetch":  # one BLOCK_N tile per program, A in K_TILES tiles, one stage
            bn, bk, _, warps = pair_prefetch_tiles(K, rank, N, False)
            cfg = dataclasses.replace(cfg, block_size_n=bn, block_size_k=bk, num_n_splits=-(-N // bn),
                                      num_warps=warps, num_stages=1)
        k = compile_pair(dtype, cfg, K=K, N=N, R=rank, S=S, top_k=top_k, E=E, w2=w2,
                         prefetch=variant == "pair prefetch")
        regs, spill = resources(k.asm["cubin"])
        sass = _sass(k.asm["cubin"])
        splits = max(1, min(cfg.num_n_splits, -(-N // cfg.block_size_n)))
        progs = top_k * S * splits
        a_bytes = progs * rank * K * torch.finfo(dtype).bits // 8
        tiles = f"{cfg.block_size_n} x {cfg.block_size_k}, {cfg.num_warps}, {splits}"
        rows.append(f"| {width} {name} | 1 | {variant} | {tiles} | {regs} | "
                    f"{spill} | {k.metadata.shared} | {progs} | {a_bytes / 1e6:.2f} MB | "
                    f"{round_trips(sass) if sass else '-'} |")
    return rows


def programs(kernel: int, cfg, T: int, n_sizes: list[int], K: int = 0) -> int:
    """Programs that read A (the others return before loading it)."""
    if kernel == 2:
        return T * len(n_sizes) * -(-K // cfg.block_k)  # each reads one K chunk: A once in all
    if kernel == 1:
        return T * sum(-(-n // cfg.block_n) for n in n_sizes)
    splits = max(1, min(cfg.num_n_splits, -(-max(n_sizes) // cfg.block_n)))
    return T * len(n_sizes) * splits  # every program shrinks, also those with no N tile


def main() -> None:
    from vllm.lora.ops.triton_ops.lora_linear import kernel0_config, split_variant_config, token_variant_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", default="qwen3", choices=list(WIDTHS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--moe", action="store_true", help="also moe_lora_pair_kernel at one token")
    p.add_argument("--moe-widths", nargs="+", default=["qwen3"], choices=list(MOE_WIDTHS),
                   help="the MoE widths of --moe (default qwen3)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    H, QD, KVD = WIDTHS[args.width]
    lines = [f"# dense LoRA token kernels, sm_90, {args.dtype}, {args.width} width, rank {args.rank}", "",
             "| proj | tokens | kernel | BLOCK_N x BLOCK_K, warps, N-splits | regs | spill B | shared B | "
             "programs reading A | A bytes read (L2) | round trips |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name, K, ns in (("qkv", H, [QD, KVD, KVD]), ("o", QD, [H])):
        for T in args.tokens:
            base = kernel0_config(T, K, max(ns), args.rank, len(ns), dtype)
            for kernel, cfg in ((0, dataclasses.replace(base, token_kernel=0)),
                                (1, token_variant_config(T, K, max(ns), args.rank, len(ns), dtype)),
                                (2, split_variant_config(T, K, max(ns), args.rank, len(ns), dtype))):
                ks = compile_split(dtype, cfg, K=K, n_sizes=ns, R=args.rank) if kernel == 2 else \
                    [compile_token(kernel, dtype, cfg, K=K, n_sizes=ns, R=args.rank)]
                res = [resources(k.asm["cubin"]) for k in ks]
                regs = "/".join(str(r) for r, _ in res)
                spill = sum(sp or 0 for _, sp in res) if all(sp is not None for _, sp in res) else None
                sass = [_sass(k.asm["cubin"]) for k in ks]
                trips = " + ".join(str(round_trips(x)) for x in sass) if all(sass) else "-"
                shared = "/".join(str(k.metadata.shared) for k in ks)
                progs = programs(kernel, cfg, T, ns, K)
                a_bytes = progs * args.rank * (K if kernel < 2 else cfg.block_k) * torch.finfo(dtype).bits // 8
                splits = cfg.num_n_splits if kernel == 0 else "-"
                lines.append(f"| {name} | {T} | {kernel} | {cfg.block_n} x {cfg.block_k}, {cfg.num_warps}, {splits} | "
                             f"{regs} | {spill} | {shared} | {progs} | {a_bytes / 1e6:.2f} MB | {trips} |")
                print(lines[-1], flush=True)
    for width in args.moe_widths if args.moe else []:
        for row in pair_rows(width, args.rank, dtype):
            lines.append(row)
            print(row, flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
