"""Grouped expert GEMM of a fused-MoE layer: launcher, tile config, torch reference.

Both expert GEMMs are the same op on different inputs:

    GEMM1 (w13): a = hidden states [M, H], top_k_in = top_k, w = w13 [E, N=2I, H]
    GEMM2 (w2):  a = activation output [M*top_k, I], top_k_in = 1, w = w2 [E, H, I]

Flat pair p = token * top_k + k reads row ``p // top_k_in`` of ``a`` and writes
row p of ``out``:

    out[p] = (a[p // top_k_in] @ w[e].T + bias[e]) * (topk_weights.flatten()[p] if mul_routed_weight)

with e the expert of pair p, accumulated in fp32 and stored in ``out.dtype``.

Call order (the M-block size is fixed before alignment, so choose it first):

    cfg = get_fused_moe_config(num_pairs, E_local, N, K, top_k, dtype)   # a TileConfig
    al = moe_align_block_size(topk_ids, cfg.block_size_m, E_local)
    invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids,
                          block_expert_ids=al.block_expert_ids,
                          num_tokens_post_padded=al.num_tokens_post_padded,
                          top_k_in=top_k, config=cfg)

GEMM1 and GEMM2 have different (N, K), so a tuned file may give them different
BLOCK_SIZE_M: align once per distinct block_size_m, or give GEMM2's config
GEMM1's (``dataclasses.replace(cfg2, block_size_m=cfg1.block_size_m)``) and
reuse one alignment (any power of two >= 16 is valid).  The heuristic picks
BLOCK_SIZE_M from num_pairs / E alone, so without tuned files both GEMMs get
the same one.

Rows of ``out`` whose pair is in no block (expert -1: dropped / non-local) are
left untouched; the caller zeroes or skips them.

Pairwise routing (``pairwise_alignment``: one pair per block, ``pairwise=True``) can run the FMA GEMV
instead of tl.dot (``fused_moe_gemv.py``): a config with ``gemv=1``, which ``get_fused_moe_config(...,
pairwise=True)`` gives when ``GEMV_PAIRWISE`` is on (or a tuned entry says ``"GEMV": 1``); a config asked
for sorted routing (the default) never has it.  The launch is graph-safe: it
never reads device values on the host; the grid covers at most
ceil(num_pairs / BLOCK_SIZE_M) + min(num_pairs, E) M-blocks and programs past
``num_tokens_post_padded`` return at once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from vllm import envs
from vllm.kernel_configs.tile_config import TileConfig, tuned_tiles
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.config import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT, MoEActivation
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemv import (check_gemv_config, gemv_config,
                                                                      invoke_fused_moe_gemv)
from vllm.platforms import current_platform
from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import pdl_launch_kwargs

logger = init_logger(__name__)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Pairwise launches (decode among many experts) run the FMA GEMV (``fused_moe_gemv.py``): off until
# benchmarks/kernels/benchmark_moe_gemv.py has timed it against the tl.dot kernel on a GPU.
GEMV_PAIRWISE = False
# GEMM1 without LoRA writes the gated activation itself (``invoke_fused_moe_gemm(fused_activation=...)``): one
# launch and one [pairs, 2I] round trip fewer per layer; off until benchmark_decode.py --moe-fused-activation
# has timed it on a GPU.
FUSED_ACTIVATION = False


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


@functools.lru_cache(maxsize=1)
def _device_name() -> str:
    return current_platform().device_name()


def _interpreter_config(num_pairs: int, num_experts: int, N: int, K: int) -> TileConfig:
    # The interpreter pays ~5 ms per loop iteration per program: few, big tiles.
    per_expert = num_pairs / max(num_experts, 1)
    return TileConfig(block_size_m=16 if per_expert <= 16 else 32, block_size_n=_pow2_at_least(N, 16, 128),
                      block_size_k=_pow2_at_least(K, 16, 128), group_size_m=1, num_warps=4, num_stages=1)


_NUM_SMS = 132  # H100 SXM and H200


def _gpu_config(num_pairs: int, num_experts: int, N: int, K: int, dtype: torch.dtype) -> TileConfig:
    """Hopper heuristic, from sweeps on an H200 (Qwen3-30B-A3B, Mixtral-8x7B and
    gpt-oss-20b shapes, bf16).  Decode is bound by reading each routed expert's
    weight once: small M-tiles (little padding).  Prefill grows the M-tile so
    each weight tile is reused by more rows, up to 128 x 256 tiles."""
    per_expert = num_pairs / max(num_experts, 1)  # average rows per expert
    if per_expert <= 8:
        bm, bn, bk, group, warps = 16, 128, 128, 1, 4
        if min(num_pairs, num_experts) * -(-N // 128) < _NUM_SMS:
            # Too few tiles to fill the SMs (few experts touched, narrow N):
            # narrower, deeper tiles double the programs in flight.
            bn, bk = 64, 256
    elif per_expert <= 32:
        bm, bn, bk, group, warps = 32, 128, 128, 8, 4
    elif per_expert <= 96:
        bm, bn, bk, group, warps = 64, 256, 64, 8, 8
    else:
        bm, bn, bk, group, warps = 128, 256, 64, 8, 8
    if dtype == torch.float32:  # twice the bytes per element: keep shared memory in budget
        bk //= 2
    return TileConfig(block_size_m=bm, block_size_n=min(bn, _pow2_at_least(N, 16, 256)),
                      block_size_k=min(bk, _pow2_at_least(K, 16, 256)), group_size_m=group, num_warps=warps,
                      num_stages=3)


@functools.lru_cache(maxsize=1024)
def _cached_config(num_pairs: int, num_experts: int, N: int, K: int, top_k: int, dtype: torch.dtype, interp: bool,
                   tuned_folder: Optional[str], pairwise: bool, gemv_pairwise: bool) -> TileConfig:
    if interp:
        cfg = _interpreter_config(num_pairs, num_experts, N, K)
        return gemv_config(num_pairs, N, K, dtype, cfg.block_size_m) if gemv_pairwise and pairwise else cfg
    dot = _gpu_config(num_pairs, num_experts, N, K, dtype)
    num_tokens = max(num_pairs // max(top_k, 1), 1)
    key = {"E": num_experts, "N": N, "K": K}
    tuned = tuned_tiles(dot, "fused_moe_gemm", key, num_tokens, _device_name(), check=check_tile_config)
    if tuned.gemv:  # an entry tuned with the GEMV: on pairwise launches, over the GEMV's own tiles
        if pairwise:
            return tuned_tiles(gemv_config(num_pairs, N, K, dtype, dot.block_size_m), "fused_moe_gemm", key,
                               num_tokens, _device_name(), check=check_tile_config)
        # e.g. a one-token entry that is the nearest to a sorted launch
        logger.warning("tuned fused_moe_gemm entry with GEMV=1 for E=%d N=%d K=%d is the nearest to %d tokens, asked "
                       "for sorted routing: the GEMV runs on pairwise routing only; using the heuristic's tiles",
                       num_experts, N, K, num_tokens)
        return dot
    if gemv_pairwise and pairwise:
        if tuned != dot:
            logger.info("GEMV_PAIRWISE: pairwise launches of E=%d N=%d K=%d run the GEMV, not the tl.dot tiles of "
                        "the tuned entry nearest to %d tokens (tune with the GEMV to compare)",
                        num_experts, N, K, num_tokens)
        return gemv_config(num_pairs, N, K, dtype, dot.block_size_m)
    return tuned


def get_fused_moe_config(num_pairs: int, num_experts: int, N: int, K: int, top_k: int,
                         dtype: torch.dtype, *, pairwise: bool = False) -> TileConfig:
    """Tile config of one expert GEMM: a tuned file when one matches, else a heuristic.

    num_pairs: routed (token, k) pairs, M * top_k.  num_experts: E_local.
    N, K: the GEMM's output / reduction width (GEMM1: 2I, H; GEMM2: H, I).
    A tuned entry (op ``fused_moe_gemm``, key E, N, K, table by token count) overrides the
    heuristic's fields it names.  ``block_size_m`` is the block size to pass to
    ``moe_align_block_size``.  ``pairwise``: the launch will walk ``pairwise_alignment`` (as
    ``align_for_experts`` chooses when ``use_pairwise_alignment``) and pass ``pairwise=True``; only such a
    launch may get the GEMV (``gemv=1``): when a tuned entry says GEMV=1 (its other keys over the GEMV's
    heuristic tiles), or when ``GEMV_PAIRWISE`` is on (entries tuned for the tl.dot kernel, without GEMV=1,
    are then not used there: logged).  A tuned entry with GEMV=1 never reaches a sorted launch (logged).
    """
    key = (int(num_pairs), int(num_experts), int(N), int(K), int(top_k), dtype)
    return _cached_config(*key, triton_interpreting(), envs.VLLM_TUNED_CONFIG_FOLDER, bool(pairwise), GEMV_PAIRWISE)


def get_two_gemm_configs(num_pairs: int, num_experts: int, N: int, K: int, act_n: int, top_k: int,
                         dtype: torch.dtype, *, pairwise: bool = False) -> tuple[TileConfig, TileConfig]:
    """The configs of GEMM1 ([pairs, K] x w13 [N, K]^T) and GEMM2 ([pairs, act_n] x w2 [K, act_n]^T) of one
    layer, GEMM2's with GEMM1's ``block_size_m`` so that both walk one expert alignment (its tuned entry is
    indexed by pairs: it is asked with top_k = 1).  ``pairwise`` as ``get_fused_moe_config``'s."""
    cfg1 = get_fused_moe_config(num_pairs, num_experts, N, K, top_k, dtype, pairwise=pairwise)
    cfg2 = get_fused_moe_config(num_pairs, num_experts, K, act_n, 1, dtype, pairwise=pairwise)
    if cfg2.block_size_m != cfg1.block_size_m:
        cfg2 = dataclasses.replace(cfg2, block_size_m=cfg1.block_size_m)
    return cfg1, cfg2


def check_tile_config(config: TileConfig) -> None:
    """What ``invoke_fused_moe_gemm`` needs of a config: power-of-two tiles >= 16, no split-K; with
    ``gemv=1`` (the FMA GEMV) BLOCK_SIZE_N / BLOCK_SIZE_K any powers of two and SPLIT_K up to 16."""
    if type(config) is not TileConfig:  # a 4-bit GEMM's config (a subclass) has fields this GEMM would ignore
        raise TypeError(f"config must be a TileConfig (get_fused_moe_config, or TileConfig.from_json for a "
                        f"dict of BLOCK_SIZE_M, ...), got {type(config).__name__}")
    if config.gemv not in (0, 1):
        raise ValueError(f"GEMV={config.gemv}: 1 (the FMA GEMV on pairwise routing) or 0 (tl.dot)")
    if config.gemv:
        v = config.block_size_m
        if v < 16 or v & (v - 1):
            raise ValueError(f"BLOCK_SIZE_M={v}: the alignment's block size must be a power of two >= 16")
        check_gemv_config(config)
        return
    for name in ("block_size_m", "block_size_n", "block_size_k"):
        v = getattr(config, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name.upper()}={v}: tl.dot tiles must be powers of two >= 16")
    if config.split_k != 1:
        raise ValueError(f"SPLIT_K={config.split_k}: the bf16 grouped GEMM has no split-K, it must be 1")


def pairs_per_touched_expert(num_pairs: int, num_experts: int) -> float:
    """Expected pairs per expert that gets any, routing uniform over ``num_experts``."""
    E = max(num_experts, 1)
    return num_pairs / max(E * (1.0 - (1.0 - 1.0 / E) ** num_pairs), 1.0)


def check_pair_routing(out: torch.Tensor, num_pairs: int, N: int, E: int, bm: int, *,
                       sorted_token_ids: torch.Tensor, block_expert_ids: torch.Tensor,
                       num_tokens_post_padded: torch.Tensor, topk_weights: Optional[torch.Tensor],
                       mul_routed_weight: bool, bias: Optional[torch.Tensor],
                       others: tuple[torch.Tensor, ...] = (), out_cols: Optional[int] = None) -> int:
    """The checks every grouped-GEMM launcher makes on its output and routing (this one, MXFP4, int4):
    out [num_pairs, out_cols or N]; int32 routing aligned to BLOCK_SIZE_M; routed weights; a float bias
    [E, N]; one device.  Returns the sorted-ids length EM."""
    cols = N if out_cols is None else out_cols
    if tuple(out.shape) != (num_pairs, cols):
        raise ValueError(f"out must be [{num_pairs}, {cols}] (num_rows * top_k_in, {'N' if cols == N else 'N // 2'}), "
                         f"got {tuple(out.shape)}")
    for name, t in (("sorted_token_ids", sorted_token_ids), ("block_expert_ids", block_expert_ids),
                    ("num_tokens_post_padded", num_tokens_post_padded)):
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor, got {t.dtype}")
    EM = sorted_token_ids.numel()
    if EM % bm or block_expert_ids.numel() != EM // bm:
        raise ValueError(
            f"alignment does not match BLOCK_SIZE_M={bm}: {EM} sorted ids, {block_expert_ids.numel()} blocks; "
            "align with the config's BLOCK_SIZE_M"
        )
    if num_tokens_post_padded.numel() != 1:
        raise ValueError("num_tokens_post_padded must hold one value")
    if mul_routed_weight:
        if topk_weights is None:
            raise ValueError("mul_routed_weight=True needs topk_weights")
        if topk_weights.numel() != num_pairs or not topk_weights.is_floating_point():
            raise ValueError(f"topk_weights must be float with {num_pairs} values, got {tuple(topk_weights.shape)}")
    if bias is not None and (tuple(bias.shape) != (E, N) or not bias.is_floating_point()):
        raise ValueError(f"bias must be float [{E}, {N}], got {tuple(bias.shape)} {bias.dtype}")
    tensors = [*others, out, sorted_token_ids, block_expert_ids, num_tokens_post_padded, bias,
               topk_weights if mul_routed_weight else None]
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return EM


def invoke_fused_moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    *,
    sorted_token_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    top_k_in: int,
    topk_weights: Optional[torch.Tensor] = None,
    mul_routed_weight: bool = False,
    bias: Optional[torch.Tensor] = None,
    config: TileConfig,
    pairwise: bool = False,
    fused_activation: Optional[MoEActivation] = None,
) -> None:
    """Write ``out[p] = (a[p // top_k_in] @ w[e_p].T + bias[e_p]) * weight_p`` for every routed pair p.

    a: [num_rows, K] fp16/bf16/fp32.  w: [E_local, N, K], same dtype as ``a``.
    out: [num_pairs, N] float, num_pairs = num_rows * top_k_in (any strides).
    sorted_token_ids / block_expert_ids / num_tokens_post_padded: int32, from
        ``moe_align_block_size(topk_ids, config.block_size_m, E_local)``;
        the sentinel there must be num_pairs.
    topk_weights: [M, top_k] (num_pairs values), read when ``mul_routed_weight``.
    bias: optional [E_local, N], added before the routed-weight multiply.
    pairwise: the routing is ``pairwise_alignment``'s (block p holds pair p alone, ``block_expert_ids``
        is each pair's expert); required by a config with ``gemv=1``, which then runs the FMA GEMV.
    Pairs in no block are not written (the GEMV with SPLIT_K > 1 writes them as zeros).
    fused_activation: a gated activation (SILU, GELU, SWIGLUOAI): out [num_pairs, N // 2] is that activation
        of the GEMM's rounded output, bit for bit ``moe_activation`` of it (GEMM1 without LoRA; not with
        ``mul_routed_weight`` or a ``gemv=1`` config); BLOCK_SIZE_N is halved: two accumulators per program.
    No host synchronisation (graph safe).
    """
    check_tile_config(config)
    bm, bn, bk = config.block_size_m, config.block_size_n, config.block_size_k
    act_code = _fused_act_code(fused_activation, w.shape[1], mul_routed_weight, config)
    if act_code >= 0:
        bn = max(16, bn // 2)
    if a.dim() != 2 or w.dim() != 3 or out.dim() != 2:
        raise ValueError(f"expected a 2-D, w 3-D, out 2-D; got {a.dim()}, {w.dim()}, {out.dim()}")
    if a.dtype not in _FLOAT_DTYPES or w.dtype != a.dtype:
        raise ValueError(f"a and w must share a dtype among fp16/bf16/fp32; got {a.dtype}, {w.dtype}")
    if out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out dtype {out.dtype} is not fp16/bf16/fp32")
    E, N, K = w.shape
    if a.shape[1] != K:
        raise ValueError(f"a has K={a.shape[1]} but w has K={K}")
    if K == 0:
        raise ValueError("K must be positive")
    if (N - 1) * abs(w.stride(1)) + (K - 1) * abs(w.stride(2)) >= 2**31:
        raise ValueError(f"one expert's [{N}, {K}] weight spans 2**31 elements or more: offsets inside it are int32")
    if top_k_in < 1:
        raise ValueError(f"top_k_in must be >= 1, got {top_k_in}")
    num_pairs = a.shape[0] * top_k_in
    n_out = N // 2 if act_code >= 0 else N
    EM = check_pair_routing(out, num_pairs, N, E, bm, out_cols=n_out, sorted_token_ids=sorted_token_ids,
                            block_expert_ids=block_expert_ids, num_tokens_post_padded=num_tokens_post_padded,
                            topk_weights=topk_weights, mul_routed_weight=mul_routed_weight, bias=bias,
                            others=(a, w))
    if pairwise and block_expert_ids.numel() != num_pairs:
        raise ValueError(f"pairwise routing has one block per pair: {num_pairs} pairs, "
                         f"{block_expert_ids.numel()} blocks (use pairwise_alignment)")
    if config.gemv and not pairwise:
        raise ValueError("GEMV=1 runs on pairwise routing only (pairwise_alignment, pairwise=True); "
                         "sorted routing needs a config with GEMV=0")
    if num_pairs == 0 or N == 0 or EM == 0:
        return
    if config.gemv:
        invoke_fused_moe_gemv(a, w, out, pair_expert_ids=block_expert_ids, top_k_in=top_k_in, config=config,
                              topk_weights=topk_weights, mul_routed_weight=mul_routed_weight, bias=bias)
        return

    from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemm_kernel import _fused_moe_gemm_kernel

    weights = topk_weights.reshape(-1) if mul_routed_weight else out  # dummy pointer when unused
    bias_arg = bias if bias is not None else out
    # Used blocks are a prefix of at most ceil(num_pairs / bm) + min(num_pairs, E)
    # (each non-empty expert adds at most one partly filled block): launch only
    # those, not the worst-case buffer length (at decode that is ~10x fewer).
    # Pairwise routing has one block per pair (two pairs of one expert: two blocks).
    num_pid_m = num_pairs if pairwise else min(EM // bm, -(-num_pairs // bm) + min(num_pairs, E))
    grid = (num_pid_m * -(-n_out // bn),)
    _fused_moe_gemm_kernel[grid](
        a_ptr=a, w_ptr=w, out_ptr=out, bias_ptr=bias_arg, topk_weights_ptr=weights,
        sorted_token_ids_ptr=sorted_token_ids, block_expert_ids_ptr=block_expert_ids,
        num_tokens_post_padded_ptr=num_tokens_post_padded,
        N=n_out, K=K, num_pid_m=num_pid_m, num_pairs=num_pairs, top_k_in=top_k_in,
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_we=w.stride(0), stride_wn=w.stride(1), stride_wk=w.stride(2),
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_be=bias.stride(0) if bias is not None else 0, stride_bn=bias.stride(1) if bias is not None else 0,
        HAS_BIAS=bias is not None,
        MUL_ROUTED_WEIGHT=mul_routed_weight,
        UPCAST_DOT=triton_interpreting() and a.dtype != torch.float32,
        EVEN_K=K % bk == 0,
        BLOCK_SIZE_M=bm,
        BLOCK_SIZE_N=bn,
        BLOCK_SIZE_K=bk,
        GROUP_SIZE_M=config.group_size_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch_kwargs(a.device),
        **({} if act_code < 0 else dict(FUSED_ACT=act_code, alpha=SWIGLUOAI_ALPHA, limit=SWIGLUOAI_LIMIT)),
    )


def _fused_act_code(act: Optional[MoEActivation], N: int, mul_routed_weight: bool, config: TileConfig) -> int:
    """The kernel's FUSED_ACT for ``fused_activation``: -1 for none; refuses what the epilogue cannot do."""
    if act is None:
        return -1
    codes = {MoEActivation.SILU: 0, MoEActivation.GELU: 1, MoEActivation.SWIGLUOAI: 2}
    if act not in codes:
        raise ValueError(f"fused_activation must be a gated activation ({', '.join(a.value for a in codes)}), "
                         f"got {act}")
    if N % 2 or mul_routed_weight or config.gemv:
        raise ValueError(f"fused_activation needs an even N (got {N}), no mul_routed_weight and a tl.dot config "
                         "(GEMV=0)")
    return codes[act]


def fused_moe_gemm_reference(
    a: torch.Tensor,
    w: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    top_k_in: int,
    topk_weights: Optional[torch.Tensor] = None,
    mul_routed_weight: bool = False,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """fp32 torch reference: [numel(topk_ids), N]; pairs with expert -1 are zeros.

    Loops over experts and gathers that expert's pairs, so it is obviously right
    and still fast enough for realistic sizes on a GPU.
    """
    ids = topk_ids.reshape(-1).long()
    E, N, _ = w.shape
    out = torch.zeros(ids.numel(), N, dtype=torch.float32, device=a.device)
    rows = torch.arange(ids.numel(), device=a.device) // top_k_in
    for e in range(E):
        pairs = (ids == e).nonzero().flatten()
        if pairs.numel() == 0:
            continue
        y = a[rows[pairs]].float() @ w[e].float().T
        if bias is not None:
            y = y + bias[e].float()
        if mul_routed_weight:
            y = y * topk_weights.reshape(-1)[pairs].float()[:, None]
        out[pairs] = y
    return out
