"""The split-K variant of the fused MoE LoRA op on sorted routing (``MoELoRATileConfig.shrink_split_k`` > 1).

``fused_moe_lora`` calls ``launch_split`` in place of ``moe_lora_sorted_kernel`` when the
config asks for it: a shrink launch over (M-blocks, slices, K-splits) writing fp32
partials, then an expand launch over (M-blocks, slices, N-splits) summing them (kernels
and the reason: ``_moe_lora_split_kernels.py``).  Same semantics and same arguments as
the fused kernel; the partials buffer is allocated per call like the shrink op's output
(no host synchronisation: CUDA-graph safe).  ``launch_pair_split`` is the same for the small-batch path
(one program per (token, expert) pair, no alignment).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from vllm.lora.ops.moe_lora_align import MoELoRAAlignment
from vllm.triton_utils import next_power_of_2


def split_layout(K: int, shrink_split_k: int) -> tuple[int, int]:
    """(tile width, number of splits) of the split shrink: each split loads one tile of
    next_pow2(cdiv(K, shrink_split_k)) columns (at least 16); as many splits as K needs of them,
    so at most ``shrink_split_k`` (``MoELoRATileConfig.block_size_k`` does not apply here)."""
    width = max(16, next_power_of_2(-(-max(K, 1) // max(1, shrink_split_k))))
    return width, -(-max(K, 1) // width)


# shared memory one tile of the split shrink may take: (BLOCK_M + BLOCK_R) x BLOCK_K operand elements; 192 KiB
# is the largest measured to compile and run on sm_90 (BLOCK_M 16, BLOCK_R 32, 2048 columns, bf16)
_SHRINK_TILE_BYTES = 192 * 1024


def split_tiles(width: int, block_m: int, block_r: int, elem_bytes: int) -> tuple[int, int]:
    """(tile width, tiles) of one split of ``width`` columns: the widest power-of-two tile whose x and A^T
    operands fit ``_SHRINK_TILE_BYTES`` (at least 16 columns), and as many tiles as the split needs."""
    tile = width
    while tile > 16 and (block_m + block_r) * tile * elem_bytes > _SHRINK_TILE_BYTES:
        tile //= 2
    return tile, -(-width // tile)


def alloc_partials(num_parts: int, num_slices: int, numel: int, rank: int, device: torch.device) -> torch.Tensor:
    """fp32 [parts, slices, pairs, rank] scratch for the shrink's partials; never read where not written."""
    return torch.empty((num_parts, num_slices, numel, rank), dtype=torch.float32, device=device)


def _pick(kernel: Any, args: dict[str, Any]) -> dict[str, Any]:
    names = set(kernel.arg_names)
    return {k: v for k, v in args.items() if k in names}


def launch_split(args: dict[str, Any], *, alignment: MoELoRAAlignment, blocks: int, num_slices: int,
                 n_splits: int, shrink_split_k: int, interp: bool, expand_mode: int, shared_a: bool = False) -> None:
    """Shrink + expand of one slice group in two launches.

    args: the fused kernel's named arguments as ``fused_moe_lora._run`` builds them (pointers,
    sizes, strides, constexprs, ``num_warps`` / ``num_stages``); blocks: the M-blocks to launch.
    shared_a: every slice reads the same A (``stride_as`` 0): one slice is shrunk, and every slice's
    expand reads its partials.
    """
    from vllm.lora.ops.triton_ops import _moe_lora_split_kernels as kern

    x, R, K, numel = args["x_ptr"], args["R"], args["K"], args["numel"]
    block_r = args["BLOCK_R"]
    width, parts = split_layout(K, shrink_split_k)
    shrink_slices = 1 if shared_a else num_slices
    part = alloc_partials(parts, shrink_slices, numel, R, x.device)
    common = dict(args, sorted_ids_ptr=alignment.sorted_token_ids, block_vids_ptr=alignment.block_virtual_ids,
                  num_post_padded_ptr=alignment.num_tokens_post_padded, part_ptr=part,
                  stride_pk=part.stride(0), stride_ps=0 if shared_a else part.stride(1), stride_pp=part.stride(2),
                  UPCAST=interp, FP32_PRECISION="ieee" if interp else "tf32x3", BLOCK_M=alignment.block_size,
                  BLOCK_R=block_r, EXPAND_MODE=expand_mode)
    launch = dict(num_warps=args["num_warps"], num_stages=args["num_stages"])
    elem = 4 if interp else x.element_size()  # the interpreter upcasts the operands
    tile, tiles = split_tiles(width, alignment.block_size, block_r, elem)
    shrink = kern.moe_lora_split_shrink_kernel
    shrink[(blocks, shrink_slices, parts)](**dict(_pick(shrink, common), BLOCK_K=tile, K_TILES=tiles), **launch)
    expand = kern.moe_lora_split_expand_kernel
    expand[(blocks, num_slices, n_splits)](**_pick(expand, common), NUM_PARTS=parts, **launch)


def launch_pair_split(args: dict[str, Any], *, pair_args: dict[str, Any], numel: int, num_slices: int,
                      n_splits: int, width: int, interp: bool, fanout: bool = False,
                      expand_block_n: Optional[int] = None, shared_a: bool = False) -> None:
    """The small-batch path's shrink + expand of one slice group in two launches: the shrink over K ranges of
    ``width`` columns (``split_layout``), the expand over ``n_splits`` N ranges (``fanout``: one BLOCK_N tile
    per program, whatever ``n_splits`` says; ``expand_block_n``: that tile's width, default the config's).

    args: as ``launch_split``'s; pair_args: the pair kernels' routing arguments (topk ids, the token -> slot
    mapping, the enabled flags, the expert map, ``max_loras``, ``HAS_EXPERT_MAP``); shared_a: as ``launch_split``'s."""
    from vllm.lora.ops.triton_ops import _moe_lora_split_kernels as kern

    x, R, K = args["x_ptr"], args["R"], args["K"]
    width, parts = split_layout(K, -(-max(K, 1) // width))
    shrink_slices = 1 if shared_a else num_slices
    part = alloc_partials(parts, shrink_slices, numel, R, x.device)
    common = dict(args, **pair_args, part_ptr=part, stride_pk=part.stride(0),
                  stride_ps=0 if shared_a else part.stride(1), stride_pp=part.stride(2))
    launch = dict(num_warps=4 if interp else 8, num_stages=1)
    pdl = {"launch_pdl": True} if args.get("USE_PDL") else {}
    shrink = kern.moe_lora_pair_split_shrink_kernel
    shrink[(numel, shrink_slices, parts)](**dict(_pick(shrink, common), BLOCK_K=width), **launch, **pdl)
    expand = kern.moe_lora_pair_split_expand_kernel
    warps, stages = args["num_warps"], args["num_stages"]
    if fanout:  # one BLOCK_N tile per program: no serial loop of read-modify-writes
        warps, stages = 4, 1
        if expand_block_n:
            common["BLOCK_N"] = expand_block_n
        n_splits = -(-max(args["N"], 1) // common["BLOCK_N"])
        common["num_n_splits"] = n_splits
    expand[(numel, num_slices, n_splits)](**_pick(expand, common), NUM_PARTS=parts, num_warps=warps,
                                          num_stages=stages, **pdl)
