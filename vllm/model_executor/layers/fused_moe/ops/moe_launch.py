"""What the 4-bit MoE GEMM launchers share (``int4_moe_gemm``, ``int4_mma_moe``, ``mxfp4_mma_moe``): the routing and
epilogue checks of one launch, and the tensor-core launchers' split-K plumbing (where partials go, the reduction
launch, the router weights as the kernels read them)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.ops.activation import _act_code


def routed_blocks(num_pairs: int, num_experts: int, bm: int, sorted_token_ids: Optional[torch.Tensor],
                  block_expert_ids: Optional[torch.Tensor], num_tokens_post_padded: Optional[torch.Tensor],
                  pair_expert_ids: Optional[torch.Tensor], what: str) -> int:
    """Check a launch's routing (the alignment's three outputs for blocks of ``bm`` rows, or ``pair_expert_ids``:
    one block per pair) and return the blocks to launch.  ``what`` names the block size in the errors."""
    if pair_expert_ids is None:
        if sorted_token_ids is None or block_expert_ids is None or num_tokens_post_padded is None:
            raise ValueError("give the moe_align_block_size outputs (sorted) or pair_expert_ids (unsorted)")
        EM = sorted_token_ids.numel()
        if EM % bm or block_expert_ids.numel() != EM // bm:
            raise ValueError(f"alignment does not match {what}={bm}: align with that block size")
        return min(EM // bm, -(-num_pairs // bm) + min(num_pairs, num_experts))
    if sorted_token_ids is not None or block_expert_ids is not None:
        raise ValueError("give either the alignment or pair_expert_ids, not both")
    if pair_expert_ids.numel() != num_pairs or pair_expert_ids.dtype != torch.int32 \
            or not pair_expert_ids.is_contiguous():
        raise ValueError(f"pair_expert_ids must be contiguous int32 with {num_pairs} values")
    return num_pairs


def epilogue_plan(num_pairs: int, N: int, epilogue_activation: Optional[MoEActivation], epilogue_top_k: int,
                  can_fuse: bool) -> tuple[int, int, tuple[int, int]]:
    """(activation code, rows summed, out's shape) of a launch's split-reduction epilogue; ``can_fuse``: whether
    the launch splits K (and the activation is not swigluoai)."""
    if epilogue_activation is None and not epilogue_top_k:
        return -1, 1, (num_pairs, N)
    if not can_fuse or (epilogue_activation is not None and epilogue_top_k):
        raise ValueError("a fused epilogue needs SPLIT_K > 1 and one of: an activation the launcher can fuse "
                         "(the int4 ones: not swigluoai), or a top-k sum")
    if epilogue_activation is not None:
        return _act_code(epilogue_activation), 1, (num_pairs, N // 2 if epilogue_activation.is_gated else N)
    if num_pairs % epilogue_top_k:
        raise ValueError(f"{num_pairs} pairs are not whole tokens of top_k={epilogue_top_k}")
    return -1, epilogue_top_k, (num_pairs // epilogue_top_k, N)


def router_weights_f32(topk_weights: Optional[torch.Tensor], mul_routed_weight: bool,
                       num_pairs: int) -> Optional[torch.Tensor]:
    """The router weights as the CUDA kernels read them (contiguous fp32 [num_pairs]), or None when the launch does
    not multiply by them."""
    if not mul_routed_weight:
        return None
    if topk_weights is None or topk_weights.numel() != num_pairs:
        raise ValueError(f"mul_routed_weight=True needs topk_weights with {num_pairs} values")
    tw = topk_weights.reshape(-1)
    if tw.dtype != torch.float32 or not tw.is_contiguous():
        tw = tw.float().contiguous()  # graph-safe: a fresh tensor from the captured pool, no host sync
    return tw


def check_16_byte_rows(**tensors: Optional[torch.Tensor]) -> None:
    """The kernels copy 16-byte pieces: each given tensor must start and have its rows on 16-byte boundaries."""
    unaligned = [name for name, t in tensors.items()
                 if t is not None and (t.data_ptr() % 16 or any(st % (16 // t.element_size())
                                                                 for st in t.stride()[:-1]))]
    if unaligned:
        raise ValueError(f"the kernel copies 16-byte pieces: {', '.join(unaligned)} must start and have rows "
                         "on 16-byte boundaries")


def split_target(out: torch.Tensor, split: int, num_pairs: int, N: int, split_buffer: Optional[torch.Tensor],
                 may_drop_pairs: bool) -> Tuple[torch.Tensor, int, int, int]:
    """Where a launch writes: (tensor, split stride, row stride, fp32 flag): ``out`` itself, or with split-K
    fp32 partials [split, num_pairs, N] in ``split_buffer`` (a fresh one if it is too small; zeroed when pairs
    may be routed nowhere, since the reduction reads every row)."""
    if split > 1:
        need = split * num_pairs * N
        if split_buffer is None or split_buffer.numel() < need or split_buffer.dtype != torch.float32:
            split_buffer = torch.empty(need, dtype=torch.float32, device=out.device)
        target = split_buffer[:need].view(split, num_pairs, N)
        if may_drop_pairs:
            target.zero_()
        return target, target.stride(0), target.stride(1), 1
    if out.stride(1) != 1:
        raise ValueError("out must have unit column stride")
    return out, 0, out.stride(0), 0


def reduce_splits(target: torch.Tensor, out: torch.Tensor, split: int, rows: int, act_code: int, pdl: dict) -> None:
    """out = the sum of the split partials (one Triton launch), with ``epilogue_plan``'s activation or row sum."""
    from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_kernel import _split_k_reduce_kernel

    block = 1024
    _split_k_reduce_kernel[(-(-out.numel() // block),)](
        target, out, out.shape[0], out.shape[1], target.stride(0), target.stride(1), out.stride(0),
        out.stride(1), SPLIT_K=split, ROWS=rows, ACT=act_code, BLOCK=block, **pdl)
