"""Private ``@triton.jit`` body of the MoE LoRA per-pair kernels' visiting order (launcher and reason:
``moe_lora_pair_order.py``)."""
import triton
import triton.language as tl


@triton.jit
def _pair_key(topk_ids_ptr, mapping_ptr, expert_map_ptr, pairs, numel, top_k, num_experts, max_loras,
              HAS_EXPERT_MAP: tl.constexpr):
    """slot * E + local expert per pair; max_loras * E for a pair without a live route, and past it for
    ``pairs >= numel`` (masked lanes)."""
    inside = pairs < numel
    slot = tl.load(mapping_ptr + pairs // top_k, mask=inside, other=-1)
    expert = tl.load(topk_ids_ptr + pairs, mask=inside, other=-1)
    if HAS_EXPERT_MAP:
        local = tl.load(expert_map_ptr + tl.maximum(expert, 0), mask=inside, other=-1)
        expert = tl.where(expert >= 0, local, -1)
    live = (slot >= 0) & (slot < max_loras) & (expert >= 0) & (expert < num_experts)
    dead = max_loras * num_experts
    return tl.where(inside, tl.where(live, slot * num_experts + expert, dead), dead + 1)


@triton.jit
def moe_lora_pair_order_kernel(topk_ids_ptr, mapping_ptr, expert_map_ptr, order_ptr, numel, top_k, num_experts,
                               max_loras, HAS_EXPERT_MAP: tl.constexpr, BLOCK_I: tl.constexpr,
                               BLOCK_J: tl.constexpr):
    """grid (cdiv(numel, BLOCK_I),): order[rank(p)] = p, rank(p) = #pairs with a smaller key, or an equal key and
    a smaller index."""
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    key_i = _pair_key(topk_ids_ptr, mapping_ptr, expert_map_ptr, offs_i, numel, top_k, num_experts, max_loras,
                      HAS_EXPERT_MAP)
    rank = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for j0 in range(0, numel, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        key_j = _pair_key(topk_ids_ptr, mapping_ptr, expert_map_ptr, offs_j, numel, top_k, num_experts, max_loras,
                          HAS_EXPERT_MAP)
        before = (key_j[None, :] < key_i[:, None]) | ((key_j[None, :] == key_i[:, None])
                                                      & (offs_j[None, :] < offs_i[:, None]))
        rank += tl.sum(before.to(tl.int32), axis=1)
    tl.store(order_ptr + rank, offs_i.to(tl.int32), mask=offs_i < numel)
