"""Public launchers of the MoE LoRA compute: shrink (x @ A^T), expand (@ B^T), and both fused.

Per flat pair p = token * top_k + k whose token has an enabled adapter slot and
whose expert is local (pairs without one get nothing, ``out`` untouched)::

    out[p, col(s) + j] += w_p * sum_r (sum_k x[p // top_k_in, k] * A_s[slot, e, r, k]) * B_s[slot, e, j, r]

col(s) = n_offset + s * slice_stride (default: n_offset + N_0 + ... + N_{s-1}),
w_p = topk_weights.flatten()[p] with ``mul_routed_weight`` else 1.  The inner
sum (the shrink) is kept in fp32 until it has been multiplied by B.

Shapes (L = max_loras slots, E = local experts, R = max rank, zero-padded):
    x: [M, K] (w13, top_k_in = top_k) or [M * top_k, K] (w2, top_k_in = 1), fp32/fp16/bf16
    lora_a_stacked: S tensors [L, E, R, K] (tuple/list, or one [L, E, R, K] or [S, L, E, R, K] tensor)
    lora_b_stacked: S tensors [L, E, N_s, R], same dtype as x
    out: [M * top_k, cols] or [M, top_k, cols], any strides, updated in place
    topk_ids: [M, top_k] int (global ids if expert_map), topk_weights: [M, top_k]
    token_lora_mapping: [>= M] int32 slot, -1 = none; adapter_enabled: [L + 1] int32, last entry 0
    expert_map: optional [E_global] int32 global -> local, -1 = not local

``alignment`` (from ``moe_lora_align_block_size``) selects the sorted path; without
it the small-batch per-pair path runs (``moe_lora_config.use_small_batch_path``); for the fused op its kernel
by ``auto_pair_kernel``: ``moe_lora_pair_prefetch_kernel`` up to 8 pairs on slices narrower than Mixtral's,
the two launches of ``moe_lora_split.launch_pair_split`` on wider slices or from ``PAIR_SPLIT_MIN_WORK`` on,
else ``moe_lora_pair_kernel``.
``fused_moe_lora(overwrite=True)``: out = the delta (0 for pairs that get none) instead of out += delta, for
a delta buffer of its own (``experts/lora_overlap.py``): the prefetch kernel and the two launches store their
tiles without reading ``out`` where their slices cover all of its columns (``_overwrites``); elsewhere ``out`` is
zeroed first.
On the sorted path, ``config.shrink_split_k`` > 1 runs the fused op as two launches
with the shrink split along K (``moe_lora_split.py``).
Slices that are views of one buffer with a constant stride (the usual stacked
[S, L, E, ...] layout) go in one launch; others get one launch per slice.
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.kernel_configs.tile_config import MoELoRATileConfig
from vllm.lora.ops.moe_lora_align import MoELoRAAlignment
from vllm.lora.ops.triton_ops import moe_lora_checks as chk
from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config, rank_block
from vllm.lora.ops.triton_ops.moe_lora_split import launch_split
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import next_power_of_2, triton_interpreting

Stacked = chk.Stacked

# the fused op's small-batch (per-pair) kernel: 0 = moe_lora_pair_kernel; 1 = moe_lora_pair_prefetch_kernel, two
# dependent round trips instead of 8-9; 2 = two launches (below, AUTO_PAIR_SPLIT); None = by shape
# (``auto_pair_kernel``).  H200 A/B
# (benchmark_moe_lora.py --tokens 1 2 4 8 --pair-kernel 1, the whole layer with LoRA, us): Qwen3-30B-A3B 1 / 2
# tokens 49.9 -> 46.1 / 75.1 -> 73.1, gpt-oss-20b 1 / 2 tokens 98.3 -> 89.5 / 145.5 -> 142.1; slower at 16 pairs
# on gpt-oss (4 tokens 215.9 -> 226.5) and at Mixtral-8x7B's width (1 token 219.1 -> 280.6: every N tile of
# its 28672 w13 columns reloads the slot's A)
PAIR_KERNEL: Optional[int] = None
# the sorted kernel's block ids (virtual id, padded total, pair ids) loaded in one round trip before its early exits
# (``EARLY_IDS`` of ``moe_lora_sorted_kernel``; three dependent trips otherwise).  At 2048 pairs (batch 256) the
# launches are latency-bound, one partial wave of programs each as long as its chain of round trips (H100 ncu,
# thirty-fifth session).  H100 A/B (thirty-sixth session): the LoRA decode step x0.997 / x0.996 at batch 64 / 256,
# tokens identical; the Qwen3-30B-A3B layer with LoRA 497.3 / 618.5 / 1218.4 -> 497.3 / 617.4 / 1217.0 us at 256 /
# 1024 / 4096 tokens.  Never slower, one round trip shorter: on
SORTED_EARLY_IDS = True
_PAIR_PREFETCH_MAX_PAIRS = 8
_PAIR_PREFETCH_MAX_KN = 1 << 25  # K * N elements of one slice's weights (gpt-oss w13: 16.6M; Mixtral: 117M)
# above this rank A no longer fits one or two K tiles and the kernel compiles to a loop of round trips (sm_90
# static report, rank 64: gpt-oss w13 / w2 37 / 35 trips vs 19 / 20 for moe_lora_pair_kernel)
_PAIR_PREFETCH_MAX_RANK = 32
_PAIR_PREFETCH_A_ELEMS = 32768  # elements of A in one K tile of the prefetch kernel (all of K up to 2048 at rank 16)
# PAIR_KERNEL 2: the shrink over K ranges of _PAIR_SPLIT_WIDTH inputs in one launch, then the expand
# (moe_lora_split.launch_pair_split), for slices beyond the prefetch kernel's: in moe_lora_pair_kernel each
# N-split program redoes its pair's whole shrink, which at Mixtral-8x7B's w2 (K = 14336) compiles to 86 dependent
# round trips (sm_90 static report).  AUTO_PAIR_SPLIT gives it those slices by default.  H200 A/B
# (benchmark_moe_lora.py --shapes mixtral qwen3 --tokens 1 4 16 --pair-kernel 0 / 2, LoRA / base of the layer):
# Mixtral-8x7B 1 / 4 / 16 tokens 1.17 -> 1.09, 1.09 -> 1.04, 1.12 -> 1.05; forced onto Qwen3-30B-A3B's small
# slices it lost (1.22 -> 1.30 at 1 token, 1.09 -> 1.14 at 16), which AUTO_PAIR_SPLIT leaves alone
AUTO_PAIR_SPLIT = True
_PAIR_SPLIT_WIDTH = 512
# the two launches at any slice width from this much work on (pairs x K x N of one slice; None: only on the wide
# slices above), their expand with one BLOCK_N tile per program (PAIR_SPLIT_FANOUT; else the config's N-splits,
# each a serial loop of read-modify-writes), and that tile (PAIR_SPLIT_EXPAND_BLOCK_N).  moe_lora_pair_kernel makes
# every program read its pair's whole A, then walk N tile after N tile.  H200 A/B (benchmark_moe_lora.py, the
# whole layer with LoRA, us, rank 16 / 32): Qwen3-30B-A3B 32 tokens 298.4 / 326.2 -> 293.1 / 311.4, 64 tokens
# 339.7 / 408.0 -> 338.8 / 370.3; gpt-oss-20b 8 tokens 271.7 / 276.0 -> 262.8 / 270.6, 32 tokens 435.5 / 462.3 ->
# 411.9 / 427.9; it lost below this much work (Qwen3 2 tokens 70.4 / 73.6 -> 71.8 / 79.2, 4 tokens 115.8 -> 120.2
# at rank 32); Mixtral-8x7B 1 token 195.2 -> 192.0
PAIR_SPLIT_MIN_WORK: Optional[int] = 120_000_000
PAIR_SPLIT_FANOUT = True
PAIR_SPLIT_EXPAND_BLOCK_N: Optional[int] = 256  # None: the config's


def auto_pair_kernel(num_pairs: int, K: int, N: int, R: int) -> int:
    """The small-batch path's kernel for ``num_pairs`` (token, expert) pairs, a K x N slice and rank R: the
    prefetch kernel (1) up to ``_PAIR_PREFETCH_MAX_PAIRS`` pairs on slices of at most ``_PAIR_PREFETCH_MAX_KN``
    elements at ranks up to ``_PAIR_PREFETCH_MAX_RANK``; with ``AUTO_PAIR_SPLIT`` the two launches (2) on bigger
    slices, or from ``PAIR_SPLIT_MIN_WORK`` (pairs x K x N) on; else ``moe_lora_pair_kernel`` (0)."""
    if PAIR_KERNEL is not None:
        return PAIR_KERNEL
    small = num_pairs <= _PAIR_PREFETCH_MAX_PAIRS and K * N <= _PAIR_PREFETCH_MAX_KN
    if small and R <= _PAIR_PREFETCH_MAX_RANK:
        return 1
    if PAIR_SPLIT_MIN_WORK is not None and num_pairs * K * N >= PAIR_SPLIT_MIN_WORK:
        return 2
    return 2 if AUTO_PAIR_SPLIT and K * N > _PAIR_PREFETCH_MAX_KN else 0


def _overwrites(alignment: Optional[MoELoRAAlignment], numel: int, K: int, R: int, n_sizes: list[int],
                n_offset: int, slice_stride: Optional[int], cols: int) -> bool:
    """Whether the fused op's launches write every element of an ``out`` of ``numel`` rows x ``cols`` columns
    by themselves: the per-pair path on a kernel that stores zeros for pairs without a delta (the prefetch
    kernel, the two launches), and slices whose column ranges tile [0, cols) exactly."""
    if alignment is not None or any(auto_pair_kernel(numel, K, n, R) not in (1, 2) for n in n_sizes):
        return False
    starts = [n_offset + (s * slice_stride if slice_stride is not None else sum(n_sizes[:s]))
              for s in range(len(n_sizes))]
    end = 0
    for start, n in sorted(zip(starts, n_sizes)):
        if start != end:
            return False
        end = start + n
    return end == cols


def pair_prefetch_tiles(K: int, R: int, N: int, interp: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, K_TILES, num_warps) of ``moe_lora_pair_prefetch_kernel``: A in as few K tiles as
    ``_PAIR_PREFETCH_A_ELEMS`` allows (64 elements per thread), one BLOCK_N tile of one slice per program."""
    block_r = rank_block(R)
    block_k = min(next_power_of_2(max(K, 16)), 512 if interp else max(16, _PAIR_PREFETCH_A_ELEMS // block_r))
    block_n = min(next_power_of_2(max(N, 16)), 64 if interp else 128)
    warps = max(4, min(16, block_r * block_k // (32 * 64)))
    return block_n, block_k, -(-K // block_k), warps


def _run(*, do_shrink: bool, do_expand: bool, x: Optional[torch.Tensor], a_slices: list[torch.Tensor],
         b_slices: list[torch.Tensor], out: Optional[torch.Tensor], shrunk: Optional[torch.Tensor],
         topk_ids: torch.Tensor, topk_weights: Optional[torch.Tensor], token_lora_mapping: torch.Tensor,
         adapter_enabled: torch.Tensor, expert_map: Optional[torch.Tensor], alignment: Optional[MoELoRAAlignment],
         top_k: int, top_k_in: int, mul_routed_weight: bool, n_offset: int, slice_stride: Optional[int],
         config: Optional[MoELoRATileConfig], op: str, overwrite: bool = False) -> None:
    from vllm.lora.ops.triton_ops import _fused_moe_lora_kernels as kern

    m = topk_ids.shape[0]
    numel = m * top_k
    ref = a_slices[0] if do_shrink else b_slices[0]
    L, E = ref.shape[:2]
    S = len(a_slices if do_shrink else b_slices)
    K = a_slices[0].shape[3] if do_shrink else 0
    R = a_slices[0].shape[2] if do_shrink else b_slices[0].shape[3]
    n_sizes = [b.shape[2] for b in b_slices] if do_expand else [0] * S

    if config is None:
        config = get_moe_lora_config(op, num_pairs=numel, num_experts=E, max_loras=L, rank=R, K=max(K, 1),
                                     N=max(max(n_sizes), 1), num_slices=S, dtype=ref.dtype, use_tuned_config=False,
                                     device_name="cpu" if ref.device.type == "cpu" else "cuda")
    interp = triton_interpreting()

    uniform = True
    stride_as_ = chk.uniform_slice_stride(a_slices) if do_shrink else 0
    stride_bs_ = chk.uniform_slice_stride(b_slices) if do_expand else 0
    if stride_as_ is None or stride_bs_ is None or len(set(n_sizes)) != 1:
        uniform = False
    groups = [list(range(S))] if uniform else [[s] for s in range(S)]

    if do_expand:
        stride_ot, stride_oj, stride_on = chk.out_strides(out, m, top_k)
    else:
        stride_ot = stride_oj = stride_on = 0
    flat_w = topk_weights.reshape(-1) if mul_routed_weight else x if do_shrink else shrunk
    dummy = x if do_shrink else shrunk

    for group in groups:
        s0, ns = group[0], len(group)
        a = a_slices[s0] if do_shrink else None
        b = b_slices[s0] if do_expand else None
        N = n_sizes[s0]
        col0 = n_offset + (s0 * slice_stride if slice_stride is not None else sum(n_sizes[:s0]))
        sh = shrunk[s0] if (shrunk is not None and not uniform) else shrunk
        if sh is not None and sh.dim() == 2:  # one slice of the shrink: [pairs, R]
            sh_strides = dict(stride_ss=0, **chk.strides(sh, "stride_sp stride_sr"))
        else:  # [S, pairs, R], or none
            sh_strides = chk.strides(sh, "stride_ss stride_sp stride_sr")
        block_n = config.block_size_n
        splits = max(1, min(config.num_n_splits, -(-N // block_n))) if do_expand else 1
        # Launch arguments by name (the kernels' signatures), shared by both kernels.
        args = dict(
            x_ptr=x if do_shrink else dummy, a_ptr=a if do_shrink else dummy, b_ptr=b if do_expand else dummy,
            out_ptr=out if do_expand else dummy, shrunk_ptr=sh if sh is not None else dummy, w_ptr=flat_w,
            numel=numel, top_k=top_k, top_k_in=top_k_in, K=K, N=N, R=R, num_experts=E,
            **chk.strides(x if do_shrink else None, "stride_xm stride_xk"),
            stride_as=stride_as_ if (do_shrink and ns > 1) else 0,  # slice to slice, one launch for all
            **chk.strides(a, "stride_al stride_ae stride_ar stride_ak"),  # A: [L, E, R, K]
            stride_bs=stride_bs_ if (do_expand and ns > 1) else 0,
            **chk.strides(b, "stride_bl stride_be stride_bn stride_br"),  # B: [L, E, N, R]
            stride_ot=stride_ot, stride_oj=stride_oj, stride_on=stride_on,
            out_col0=col0, out_slice_cols=slice_stride if slice_stride is not None else N,
            **sh_strides, num_n_splits=splits,
            DO_SHRINK=do_shrink, DO_EXPAND=do_expand, MUL_ROUTED_WEIGHT=bool(mul_routed_weight),
            BLOCK_N=block_n, BLOCK_K=config.block_size_k, BLOCK_R=rank_block(R),
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_kwargs(dummy.device),
        )
        if overwrite:  # only the two pair kernels that store their tiles (``_overwrites``)
            args["OVERWRITE"] = True
        # the slices read one A (a fused gate_up adapter's, ``fused_moe.SHARE_W13_A``): the sorted kernel and the
        # two-launch variants shrink once for all of them
        shared_a = do_shrink and do_expand and ns > 1 and args["stride_as"] == 0
        if alignment is not None:
            block_m = alignment.block_size
            # Used blocks are a prefix of at most ceil(numel / BLOCK_M) + (non-empty groups):
            # each non-empty virtual expert adds at most one partly filled block.
            used_blocks = -(-numel // block_m) + min(numel, L * E)
            blocks = min(alignment.block_virtual_ids.numel(), used_blocks)
            expand_mode = 1 if (do_expand and b.dtype == torch.bfloat16) else 0
            if do_shrink and do_expand and config.shrink_split_k > 1:  # two launches, the shrink split along K
                launch_split(args, alignment=alignment, blocks=blocks, num_slices=ns, n_splits=splits,
                             shrink_split_k=config.shrink_split_k, interp=interp, expand_mode=expand_mode,
                             shared_a=shared_a)
                continue
            per_program = ns if shared_a else 1  # slices sharing A: one program shrinks once, expands each
            kern.moe_lora_sorted_kernel[(blocks * (ns // per_program) * splits,)](  # a block's programs adjacent
                num_slices=ns // per_program, slices_per_program=per_program,
                sorted_ids_ptr=alignment.sorted_token_ids, block_vids_ptr=alignment.block_virtual_ids,
                num_post_padded_ptr=alignment.num_tokens_post_padded,
                UPCAST=interp, FP32_PRECISION="ieee" if interp else "tf32x3",
                EXPAND_MODE=expand_mode, BLOCK_M=block_m, EARLY_IDS=bool(SORTED_EARLY_IDS), **args)
        elif do_shrink and do_expand and auto_pair_kernel(numel, K, N, R) == 2:
            from vllm.lora.ops.triton_ops.moe_lora_split import launch_pair_split

            launch_pair_split(args, pair_args=dict(
                topk_ids_ptr=topk_ids.reshape(-1), mapping_ptr=token_lora_mapping, enabled_ptr=adapter_enabled,
                expert_map_ptr=expert_map if expert_map is not None else adapter_enabled, max_loras=L,
                HAS_EXPERT_MAP=expert_map is not None), numel=numel, num_slices=ns, n_splits=splits,
                width=_PAIR_SPLIT_WIDTH, interp=interp, fanout=PAIR_SPLIT_FANOUT, shared_a=shared_a,
                expand_block_n=None if interp else PAIR_SPLIT_EXPAND_BLOCK_N)
        elif do_shrink and do_expand and auto_pair_kernel(numel, K, N, R) == 1:
            from vllm.lora.ops.triton_ops._moe_lora_pair_prefetch_kernel import moe_lora_pair_prefetch_kernel

            bn, bk, k_tiles, warps = pair_prefetch_tiles(K, R, N, interp)
            n_tiles = -(-N // bn)
            moe_lora_pair_prefetch_kernel[(numel * ns * n_tiles,)](
                num_slices=ns, topk_ids_ptr=topk_ids.reshape(-1), mapping_ptr=token_lora_mapping,
                enabled_ptr=adapter_enabled,
                expert_map_ptr=expert_map if expert_map is not None else adapter_enabled, max_loras=L,
                HAS_EXPERT_MAP=expert_map is not None, K_TILES=k_tiles,
                **{**args, "num_n_splits": n_tiles, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": 1})
        else:
            kern.moe_lora_pair_kernel[(numel * ns * splits,)](  # a pair's slices and N splits adjacent
                num_slices=ns, topk_ids_ptr=topk_ids.reshape(-1), mapping_ptr=token_lora_mapping,
                enabled_ptr=adapter_enabled,
                expert_map_ptr=expert_map if expert_map is not None else adapter_enabled, max_loras=L,
                HAS_EXPERT_MAP=expert_map is not None,
                K_TILES=-(-K // config.block_size_k) if do_shrink else 1, **args)


def fused_moe_lora(out: torch.Tensor, x: torch.Tensor, lora_a_stacked: Stacked, lora_b_stacked: Stacked, *,
                   topk_ids: torch.Tensor, topk_weights: Optional[torch.Tensor], token_lora_mapping: torch.Tensor,
                   adapter_enabled: torch.Tensor, top_k_in: int, mul_routed_weight: bool = False,
                   expert_map: Optional[torch.Tensor] = None, alignment: Optional[MoELoRAAlignment] = None,
                   n_offset: int = 0, slice_stride: Optional[int] = None,
                   config: Optional[MoELoRATileConfig] = None, overwrite: bool = False) -> None:
    """out += LoRA delta of every pair, shrink and expand in one launch (see the module docstring); with
    ``overwrite``, out = the delta (0 where a pair gets none)."""
    chk.check_config(config)
    a_slices, b_slices = chk.slices(lora_a_stacked, "lora_a_stacked"), chk.slices(lora_b_stacked, "lora_b_stacked")
    if len(a_slices) != len(b_slices):
        raise ValueError(f"{len(a_slices)} lora_a slices but {len(b_slices)} lora_b slices")
    L, E, R = a_slices[0].shape[0], a_slices[0].shape[1], a_slices[0].shape[2]
    m, top_k = chk.check_routing(topk_ids, token_lora_mapping, adapter_enabled, expert_map, L, E, a_slices[0].device)
    x = chk.check_x(x, a_slices, m, top_k, top_k_in)
    chk.out_strides(out, m, top_k)
    chk.check_b(b_slices, L, E, R, x.dtype, out.shape[-1], n_offset, slice_stride)
    chk.check_alignment(alignment, m * top_k, L, E, x.device)
    if mul_routed_weight and (topk_weights is None or topk_weights.numel() != m * top_k):
        raise ValueError(f"mul_routed_weight needs topk_weights with M*top_k={m * top_k} entries")
    if m * top_k == 0:
        return
    stores = overwrite and _overwrites(alignment, m * top_k, x.shape[1], R, [b.shape[2] for b in b_slices],
                                       n_offset, slice_stride, out.shape[-1])
    if overwrite and not stores:
        out.zero_()
    _run(do_shrink=True, do_expand=True, x=x, a_slices=a_slices, b_slices=b_slices, out=out, shrunk=None,
         topk_ids=topk_ids, topk_weights=topk_weights, token_lora_mapping=token_lora_mapping,
         adapter_enabled=adapter_enabled, expert_map=expert_map, alignment=alignment, top_k=top_k,
         top_k_in=top_k_in, mul_routed_weight=mul_routed_weight, n_offset=n_offset, slice_stride=slice_stride,
         config=config, op="fused_moe_lora", overwrite=stores)


def moe_lora_shrink(x: torch.Tensor, lora_a_stacked: Stacked, *, topk_ids: torch.Tensor,
                    token_lora_mapping: torch.Tensor, adapter_enabled: torch.Tensor, top_k_in: int,
                    expert_map: Optional[torch.Tensor] = None, alignment: Optional[MoELoRAAlignment] = None,
                    config: Optional[MoELoRATileConfig] = None) -> torch.Tensor:
    """fp32 [S, M * top_k, R]: x[p // top_k_in] @ A_s[slot, e]^T per pair; rows of pairs without LoRA are 0."""
    chk.check_config(config)
    a_slices = chk.slices(lora_a_stacked, "lora_a_stacked")
    L, E, R = a_slices[0].shape[0], a_slices[0].shape[1], a_slices[0].shape[2]
    m, top_k = chk.check_routing(topk_ids, token_lora_mapping, adapter_enabled, expert_map, L, E, a_slices[0].device)
    x = chk.check_x(x, a_slices, m, top_k, top_k_in)
    chk.check_alignment(alignment, m * top_k, L, E, x.device)
    shrunk = torch.zeros((len(a_slices), m * top_k, R), dtype=torch.float32, device=x.device)
    if m * top_k > 0:
        _run(do_shrink=True, do_expand=False, x=x, a_slices=a_slices, b_slices=[], out=None, shrunk=shrunk,
             topk_ids=topk_ids, topk_weights=None, token_lora_mapping=token_lora_mapping,
             adapter_enabled=adapter_enabled, expert_map=expert_map, alignment=alignment, top_k=top_k,
             top_k_in=top_k_in, mul_routed_weight=False, n_offset=0, slice_stride=None, config=config,
             op="moe_lora_shrink")
    return shrunk


def moe_lora_expand(out: torch.Tensor, shrunk_fp32: torch.Tensor, lora_b_stacked: Stacked, *,
                    topk_ids: torch.Tensor, topk_weights: Optional[torch.Tensor], token_lora_mapping: torch.Tensor,
                    adapter_enabled: torch.Tensor, mul_routed_weight: bool = False,
                    expert_map: Optional[torch.Tensor] = None, alignment: Optional[MoELoRAAlignment] = None,
                    n_offset: int = 0, slice_stride: Optional[int] = None,
                    config: Optional[MoELoRATileConfig] = None) -> None:
    """out += (w_p *) shrunk_fp32[s, p] @ B_s[slot, e]^T per pair.

    shrunk_fp32: fp32 [S, M * top_k, R] with R = lora_b's last dim, any strides
    (e.g. the rank all-gather of the fully-sharded path).
    """
    chk.check_config(config)
    b_slices = chk.slices(lora_b_stacked, "lora_b_stacked")
    L, E, R = b_slices[0].shape[0], b_slices[0].shape[1], b_slices[0].shape[3]
    m, top_k = chk.check_routing(topk_ids, token_lora_mapping, adapter_enabled, expert_map, L, E, b_slices[0].device)
    if shrunk_fp32.dtype != torch.float32 or tuple(shrunk_fp32.shape) != (len(b_slices), m * top_k, R):
        raise ValueError(f"shrunk_fp32 must be fp32 [{len(b_slices)}, {m * top_k}, {R}], "
                         f"got {shrunk_fp32.dtype} {tuple(shrunk_fp32.shape)}")
    chk.out_strides(out, m, top_k)
    chk.check_b(b_slices, L, E, R, b_slices[0].dtype, out.shape[-1], n_offset, slice_stride)
    chk.check_alignment(alignment, m * top_k, L, E, b_slices[0].device)
    if mul_routed_weight and (topk_weights is None or topk_weights.numel() != m * top_k):
        raise ValueError(f"mul_routed_weight needs topk_weights with M*top_k={m * top_k} entries")
    if m * top_k == 0:
        return
    _run(do_shrink=False, do_expand=True, x=None, a_slices=[], b_slices=b_slices, out=out, shrunk=shrunk_fp32,
         topk_ids=topk_ids, topk_weights=topk_weights, token_lora_mapping=token_lora_mapping,
         adapter_enabled=adapter_enabled, expert_map=expert_map, alignment=alignment, top_k=top_k, top_k_in=1,
         mul_routed_weight=mul_routed_weight, n_offset=n_offset, slice_stride=slice_stride, config=config,
         op="moe_lora_expand")
