"""``moe_align_block_size.ONE_LAUNCH``: count, scan and scatter in one program (``_align_one_kernel``) for at most
``ONE_LAUNCH_MAX_PAIRS`` pairs.  The expert alignment's and the LoRA (adapter, expert) alignment's suites run
again here with it on (their Triton cases then take the one program: exact against the loop references), and
the one program is compared with the three launches bit for bit on both sides of the limit."""
import pytest
import torch

from tests.kernels.test_moe_align_block_size import (check_properties, test_all_pairs_dropped,
                                                     test_docstring_example, test_skewed_routing,
                                                     test_triton_and_torch_paths)
from tests.kernels.test_moe_lora_align import (test_disabled_slot_is_dropped, test_expert_map_drops_non_local_experts,
                                               test_random_mapping, test_worked_example)
from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
from vllm.model_executor.layers.fused_moe.ops import _moe_align_kernel
from vllm.model_executor.layers.fused_moe.ops import moe_align_block_size as mab

# the suites that run again here, with the one program on
__all__ = ["test_all_pairs_dropped", "test_docstring_example", "test_skewed_routing", "test_triton_and_torch_paths",
           "test_disabled_slot_is_dropped", "test_expert_map_drops_non_local_experts", "test_random_mapping",
           "test_worked_example"]


@pytest.fixture(autouse=True)
def one_launch(monkeypatch):
    """ONE_LAUNCH on, up to 4096 pairs (every case of the imported suites); counts the one-program launches."""
    calls = []
    real = _moe_align_kernel._align_one_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(mab, "ONE_LAUNCH", True)
    monkeypatch.setattr(mab, "ONE_LAUNCH_MAX_PAIRS", 4096)
    monkeypatch.setattr(_moe_align_kernel, "_align_one_kernel", Spy())
    return calls


def test_off_by_default():
    import importlib

    assert importlib.reload(mab).ONE_LAUNCH is False  # off until an H200 A/B shows it faster


def _fields(res, lora: bool):
    names = ("sorted_token_ids", "block_virtual_ids" if lora else "block_expert_ids", "num_tokens_post_padded")
    return [getattr(res, n).cpu() for n in names] + ([res.slot_padded_counts.cpu()] if lora else [])


@pytest.mark.parametrize("limit", [0, 4096])
@pytest.mark.parametrize("m,top_k,num_experts,block", [(1, 8, 128, 16), (16, 8, 128, 16), (64, 8, 128, 16),
                                                        (256, 8, 128, 32), (37, 2, 8, 64), (300, 4, 5, 1)])
def test_one_program_equals_three_launches(m, top_k, num_experts, block, limit, monkeypatch, device, one_launch):
    """The same outputs, base and LoRA groups (4 slots, one disabled, tokens without a slot), with the limit
    below (three launches) and above (one program) the pair count."""
    gen = torch.Generator().manual_seed(m + block)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(m)]).to(torch.int32)
    ids[torch.rand(ids.shape, generator=gen) < 0.05] = -1
    ids = ids.to(device)
    mapping = torch.randint(-1, 4, (m,), generator=gen, dtype=torch.int32).to(device)
    enabled = torch.tensor([1, 0, 1, 1, 0], dtype=torch.int32, device=device)
    kw = dict(num_experts=num_experts, max_loras=4, block_size=block, adapter_enabled=enabled, use_triton=True)
    outs = {}
    for lim in (limit, -1):  # -1: the three launches
        monkeypatch.setattr(mab, "ONE_LAUNCH_MAX_PAIRS", lim)
        outs[lim] = (_fields(mab.moe_align_block_size(ids, block, num_experts, use_triton=True), False),
                     _fields(moe_lora_align_block_size(ids, mapping, **kw), True))
    for got, want in zip(outs[limit], outs[-1]):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert len(one_launch) == (2 if limit >= m * top_k else 0)
    check_properties(ids.cpu(), mab.moe_align_block_size(ids, block, num_experts, use_triton=True), block,
                     num_experts)


def test_compiles_for_hopper():
    """sm_90 compile of the one program at the LoRA align's table (513 groups -> 1024 bins) and 2048 pairs."""
    from tests.utils import run_without_interpreter

    out = run_without_interpreter("tests/kernels/moe_align_one_launch_hopper_compile.py")
    assert out.count("ok ") == 2, out


def test_warps_are_a_power_of_two():
    """Triton refuses other warp counts (the interpreter ignores them: an H200 run found 9 and 10)."""
    for g_pad in (8, 256, 1024):
        for numel in range(0, 4097, 7):
            w = mab._one_launch_warps(g_pad, numel)
            assert w & (w - 1) == 0 and 1 <= w <= 16, (g_pad, numel, w)
