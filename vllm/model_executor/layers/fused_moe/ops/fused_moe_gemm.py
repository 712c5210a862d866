"""Grouped expert GEMM of a fused-MoE layer: launcher, tile config, torch reference.

Both expert GEMMs are the same op on different inputs:

    GEMM1 (w13): a = hidden states [M, H], top_k_in = top_k, w = w13 [E, N=2I, H]
    GEMM2 (w2):  a = activation output [M*top_k, I], top_k_in = 1, w = w2 [E, H, I]

Flat pair p = token * top_k + k reads row ``p // top_k_in`` of ``a`` and writes
row p of ``out``:

    out[p] = (a[p // top_k_in] @ w[e].T + bias[e]) * (topk_weights.flatten()[p] if mul_routed_weight)

with e the expert of pair p, accumulated in fp32 and stored in ``out.dtype``.

Call order (the M-block size is fixed before alignment, so choose it first):

    cfg = get_fused_moe_config(num_pairs, E_local, N, K, top_k, dtype)
    al = moe_align_block_size(topk_ids, cfg["BLOCK_SIZE_M"], E_local)
    invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids,
                          block_expert_ids=al.block_expert_ids,
                          num_tokens_post_padded=al.num_tokens_post_padded,
                          top_k_in=top_k, config=cfg)

GEMM1 and GEMM2 have different (N, K), so a tuned file may give them different
BLOCK_SIZE_M: align once per distinct BLOCK_SIZE_M, or set GEMM2's
config["BLOCK_SIZE_M"] to GEMM1's and reuse one alignment (any power of two
>= 16 is valid).  The heuristic picks BLOCK_SIZE_M from num_pairs / E alone, so
without tuned files both GEMMs get the same one.

Rows of ``out`` whose pair is in no block (expert -1: dropped / non-local) are
left untouched; the caller zeroes or skips them.  The launch is graph-safe: it
never reads device values on the host; the grid covers at most
ceil(num_pairs / BLOCK_SIZE_M) + min(num_pairs, E) M-blocks and programs past
``num_tokens_post_padded`` return at once.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from vllm import envs
from vllm.kernel_configs import lookup_tuned_config
from vllm.platforms import current_platform
from vllm.platforms.interface import triton_interpreting

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


@functools.lru_cache(maxsize=1)
def _device_name() -> str:
    return current_platform().device_name()


def _interpreter_config(num_pairs: int, num_experts: int, N: int, K: int) -> dict[str, Any]:
    # The interpreter pays ~5 ms per loop iteration per program: few, big tiles.
    per_expert = num_pairs / max(num_experts, 1)
    return {
        "BLOCK_SIZE_M": 16 if per_expert <= 16 else 32,
        "BLOCK_SIZE_N": _pow2_at_least(N, 16, 128),
        "BLOCK_SIZE_K": _pow2_at_least(K, 16, 128),
        "GROUP_SIZE_M": 1,
        "num_warps": 4,
        "num_stages": 1,
    }


_NUM_SMS = 132  # H100 SXM and H200


def _gpu_config(num_pairs: int, num_experts: int, N: int, K: int, dtype: torch.dtype) -> dict[str, Any]:
    """Hopper heuristic, from sweeps on an H200 (Qwen3-30B-A3B, Mixtral-8x7B and
    gpt-oss-20b shapes, bf16).  Decode is bound by reading each routed expert's
    weight once: small M-tiles (little padding).  Prefill grows the M-tile so
    each weight tile is reused by more rows, up to 128 x 256 tiles."""
    per_expert = num_pairs / max(num_experts, 1)  # average rows per expert
    if per_expert <= 8:
        cfg = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
        if min(num_pairs, num_experts) * -(-N // 128) < _NUM_SMS:
            # Too few tiles to fill the SMs (few experts touched, narrow N):
            # narrower, deeper tiles double the programs in flight.
            cfg.update(BLOCK_SIZE_N=64, BLOCK_SIZE_K=256)
    elif per_expert <= 32:
        cfg = dict(BLOCK_SIZE_M=32, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=8, num_warps=4, num_stages=3)
    elif per_expert <= 96:
        cfg = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_SIZE_M=128, BLOCK_SIZE_N=256, BLOCK_SIZE_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=3)
    if dtype == torch.float32:  # twice the bytes per element: keep shared memory in budget
        cfg["BLOCK_SIZE_K"] //= 2
    cfg["BLOCK_SIZE_N"] = min(cfg["BLOCK_SIZE_N"], _pow2_at_least(N, 16, 256))
    cfg["BLOCK_SIZE_K"] = min(cfg["BLOCK_SIZE_K"], _pow2_at_least(K, 16, 256))
    return cfg


@functools.lru_cache(maxsize=1024)
def _cached_config(num_pairs, num_experts, N, K, top_k, dtype, interp: bool, tuned_folder: Optional[str]):
    if interp:
        return _interpreter_config(num_pairs, num_experts, N, K)
    num_tokens = max(num_pairs // max(top_k, 1), 1)
    tuned = lookup_tuned_config("fused_moe_gemm", {"E": num_experts, "N": N, "K": K}, num_tokens, _device_name())
    cfg = _gpu_config(num_pairs, num_experts, N, K, dtype)
    if tuned:
        cfg.update({k: int(v) for k, v in tuned.items() if k in _CONFIG_KEYS})
    return cfg


def get_fused_moe_config(num_pairs: int, num_experts: int, N: int, K: int, top_k: int, dtype: torch.dtype) -> dict:
    """Tile config of one expert GEMM: a tuned file when one matches, else a heuristic.

    num_pairs: routed (token, k) pairs, M * top_k.  num_experts: E_local.
    N, K: the GEMM's output / reduction width (GEMM1: 2I, H; GEMM2: H, I).
    Returns BLOCK_SIZE_M/N/K, GROUP_SIZE_M, num_warps, num_stages (a fresh dict).
    BLOCK_SIZE_M is the block size to pass to ``moe_align_block_size``.
    """
    key = (int(num_pairs), int(num_experts), int(N), int(K), int(top_k), dtype)
    return dict(_cached_config(*key, triton_interpreting(), envs.VLLM_TUNED_CONFIG_FOLDER))


def _check_config(config: dict) -> None:
    missing = [k for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K") if k not in config]
    if missing:
        raise ValueError(f"config lacks {missing}; build it with get_fused_moe_config")
    for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
        v = int(config[k])
        if v < 16 or v & (v - 1):
            raise ValueError(f"config[{k!r}]={v}: tl.dot tiles must be powers of two >= 16")


def check_pair_routing(out: torch.Tensor, num_pairs: int, N: int, E: int, bm: int, *,
                       sorted_token_ids: torch.Tensor, block_expert_ids: torch.Tensor,
                       num_tokens_post_padded: torch.Tensor, topk_weights: Optional[torch.Tensor],
                       mul_routed_weight: bool, bias: Optional[torch.Tensor],
                       others: tuple[torch.Tensor, ...] = ()) -> int:
    """The checks every grouped-GEMM launcher makes on its output and routing (this one, MXFP4, int4):
    out [num_pairs, N]; int32 routing aligned to BLOCK_SIZE_M; routed weights; a float bias [E, N];
    one device.  Returns the sorted-ids length EM."""
    if tuple(out.shape) != (num_pairs, N):
        raise ValueError(f"out must be [{num_pairs}, {N}] (num_rows * top_k_in, N), got {tuple(out.shape)}")
    for name, t in (("sorted_token_ids", sorted_token_ids), ("block_expert_ids", block_expert_ids),
                    ("num_tokens_post_padded", num_tokens_post_padded)):
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor, got {t.dtype}")
    EM = sorted_token_ids.numel()
    if EM % bm or block_expert_ids.numel() != EM // bm:
        raise ValueError(
            f"alignment does not match BLOCK_SIZE_M={bm}: {EM} sorted ids, {block_expert_ids.numel()} blocks; "
            "align with config['BLOCK_SIZE_M']"
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
    config: dict,
) -> None:
    """Write ``out[p] = (a[p // top_k_in] @ w[e_p].T + bias[e_p]) * weight_p`` for every routed pair p.

    a: [num_rows, K] fp16/bf16/fp32.  w: [E_local, N, K], same dtype as ``a``.
    out: [num_pairs, N] float, num_pairs = num_rows * top_k_in (any strides).
    sorted_token_ids / block_expert_ids / num_tokens_post_padded: int32, from
        ``moe_align_block_size(topk_ids, config["BLOCK_SIZE_M"], E_local)``;
        the sentinel there must be num_pairs.
    topk_weights: [M, top_k] (num_pairs values), read when ``mul_routed_weight``.
    bias: optional [E_local, N], added before the routed-weight multiply.
    Pairs in no block are not written.  No host synchronisation (graph safe).
    """
    _check_config(config)
    bm, bn, bk = int(config["BLOCK_SIZE_M"]), int(config["BLOCK_SIZE_N"]), int(config["BLOCK_SIZE_K"])
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
    EM = check_pair_routing(out, num_pairs, N, E, bm, sorted_token_ids=sorted_token_ids,
                            block_expert_ids=block_expert_ids, num_tokens_post_padded=num_tokens_post_padded,
                            topk_weights=topk_weights, mul_routed_weight=mul_routed_weight, bias=bias,
                            others=(a, w))
    if num_pairs == 0 or N == 0 or EM == 0:
        return

    from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemm_kernel import _fused_moe_gemm_kernel

    weights = topk_weights.reshape(-1) if mul_routed_weight else out  # dummy pointer when unused
    bias_arg = bias if bias is not None else out
    # Used blocks are a prefix of at most ceil(num_pairs / bm) + min(num_pairs, E)
    # (each non-empty expert adds at most one partly filled block): launch only
    # those, not the worst-case buffer length (at decode that is ~10x fewer).
    num_pid_m = min(EM // bm, -(-num_pairs // bm) + min(num_pairs, E))
    grid = (num_pid_m * -(-N // bn),)
    _fused_moe_gemm_kernel[grid](
        a, w, out, bias_arg, weights,
        sorted_token_ids, block_expert_ids, num_tokens_post_padded,
        N, K, num_pid_m, num_pairs, top_k_in,
        a.stride(0), a.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        HAS_BIAS=bias is not None,
        MUL_ROUTED_WEIGHT=mul_routed_weight,
        UPCAST_DOT=triton_interpreting() and a.dtype != torch.float32,
        EVEN_K=K % bk == 0,
        BLOCK_SIZE_M=bm,
        BLOCK_SIZE_N=bn,
        BLOCK_SIZE_K=bk,
        GROUP_SIZE_M=max(1, int(config.get("GROUP_SIZE_M", 1))),
        num_warps=int(config.get("num_warps", 4)),
        num_stages=int(config.get("num_stages", 3)),
    )


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
