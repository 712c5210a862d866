"""Routing for the tensor-core 4-bit GEMM tests: exact pair counts per expert, so that sorted blocks of 32 / 64
rows end with known amounts of padding (the kernel's W4_SKIP_PAD build runs a block's loop over a quarter, a
half or all of its n8 token tiles, by the block's last real row)."""
import torch

# pairs per expert: in 64-row blocks 16 (a quarter live), 17 (a half), 33 (all), 64 (a full block), 65 (a full
# block and one with 1 row), 8, none, 24; in 32-row blocks 16 / 17 / 33 give a half, all, all + one row
PADDING_COUNTS = (16, 17, 33, 64, 65, 8, 0, 24)


def counted_ids(counts=PADDING_COUNTS, seed: int = 0) -> torch.Tensor:
    """[sum(counts), 1] int32 expert ids (top_k 1) with counts[e] pairs on expert e, in a shuffled order (the
    sorted alignment must gather them); the last expert gets some."""
    assert counts[-1] > 0
    ids = torch.cat([torch.full((c,), e, dtype=torch.int32) for e, c in enumerate(counts)])
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))
    return ids[perm].reshape(-1, 1).contiguous()
