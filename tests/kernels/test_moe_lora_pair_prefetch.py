"""``moe_lora_pair_prefetch_kernel`` (``fused_moe_lora.PAIR_KERNEL = 1``; by default up to 8 pairs): the MoE LoRA
small-batch path in two dependent round trips, against the per-pair fp64 loop reference and the default
pair kernel, on the same cases as the default small-batch path (random start values that must come back
bit-identical where there is no delta, NaN around a strided out view, disabled slots, tokens without an
adapter, an expert with no pair, expert_map, the w2 layout with routed weights, several K tiles)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_fused_moe_lora import BF16, CASES, F16, SMALL, Case, _config, _id, build, check
from tests.utils import assert_close
from vllm.lora.ops.triton_ops import fused_moe_lora as op

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# beyond SMALL: A over two K tiles (K 600 > the interpreter's BLOCK_K 512), N not a multiple of BLOCK_N
EXTRA = [Case(5, 2, 4, 2, 16, dtype=F16, K=600, N=72, mul_w=True, layout="view", every=True),
         Case(3, 8, 9, 3, 32, S=1, per_pair_x=True, mul_w=True, K=40, N=100, disabled=(0,), dtype=BF16)]


@pytest.fixture
def prefetch(monkeypatch):
    """PAIR_KERNEL = 1, and a record of the kernels launched (the variant must be the one that ran)."""
    from vllm.lora.ops.triton_ops import _fused_moe_lora_kernels as kern
    from vllm.lora.ops.triton_ops import _moe_lora_pair_prefetch_kernel as pk

    monkeypatch.setattr(op, "PAIR_KERNEL", 1)
    launched = []
    for mod, name in ((pk, "moe_lora_pair_prefetch_kernel"), (kern, "moe_lora_pair_kernel")):
        real = getattr(mod, name)

        class Spy:
            def __getitem__(self, grid, _real=real, _name=name):
                launched.append(_name)
                return _real[grid]

        monkeypatch.setattr(mod, name, Spy())
    return launched


@pytest.mark.parametrize("c", SMALL + EXTRA, ids=_id)
def test_prefetch_pair_kernel_matches_reference(device, c, prefetch):
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    start = out.clone()
    op.fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, config=_config(c, device, c.M * c.top_k), **kw,
                      **geo)
    check(c, out, start, delta, parent)
    if c.M:
        assert set(prefetch) == {"moe_lora_pair_prefetch_kernel"}, prefetch


@pytest.mark.parametrize("c", [CASES[2], CASES[3]], ids=_id)
def test_prefetch_equals_default_pair_kernel(device, c, monkeypatch):
    """Both kernels from the same start: the same delta within the dtype's rounding (the K tiling differs)."""
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    outs = []
    for kernel in (0, 1):
        monkeypatch.setattr(op, "PAIR_KERNEL", kernel)
        o = out.clone()
        op.fused_moe_lora(o, x, lora_a, lora_b, top_k_in=top_k_in, config=_config(c, device, c.M * c.top_k),
                          **kw, **geo)
        outs.append(o)
    assert not torch.equal(outs[0], out)  # the delta is not zero
    assert_close(outs[1].double(), outs[0].double(), c.dtype)


def test_tiles_hold_all_of_a_at_qwen3_sizes():
    """GPU tiles: A in one K tile at rank 16 (K 2048 and 768), 64 elements per thread, 128 columns."""
    assert op.pair_prefetch_tiles(2048, 16, 768, False) == (128, 2048, 1, 16)
    assert op.pair_prefetch_tiles(768, 16, 2048, False) == (128, 1024, 1, 8)
    assert op.pair_prefetch_tiles(4096, 32, 14336, False) == (128, 1024, 4, 16)



def test_auto_choice_follows_the_h200_ab():
    """By default the prefetch kernel up to 8 pairs on slices up to gpt-oss-20b's (Qwen3 1 token, gpt-oss 1-2
    tokens); the default pair kernel at 16 Qwen3 pairs, and the two-launch split at Mixtral-8x7B's width, where
    the prefetch kernel lost, and from its work threshold on (gpt-oss-20b at 16 pairs)."""
    assert op.PAIR_KERNEL is None
    assert op.auto_pair_kernel(8, 2048, 1536, 16) == 1 and op.auto_pair_kernel(8, 768, 2048, 32) == 1  # Qwen3
    assert op.auto_pair_kernel(8, 2880, 5760, 16) == 1  # gpt-oss-20b w13, 2 tokens x top-4
    assert op.auto_pair_kernel(16, 2880, 5760, 16) == 2 and op.auto_pair_kernel(16, 2048, 1536, 16) == 0
    assert op.auto_pair_kernel(2, 4096, 28672, 16) == 2 and op.auto_pair_kernel(2, 14336, 4096, 16) == 2  # Mixtral
    assert op.auto_pair_kernel(8, 2048, 1536, 64) == 0  # rank 64: A spans K tiles, a loop of round trips


@pytest.mark.cuda
@pytest.mark.parametrize("w2", [False, True], ids=["w13", "w2"])
@pytest.mark.parametrize("M", [1, 2, 4, 8])
def test_prefetch_realistic_sizes_in_a_cuda_graph(M, w2, monkeypatch):
    """Qwen3-30B-A3B-like w13 / w2 LoRA at 1-8 tokens, 4 slots (one token without an adapter), captured in a
    CUDA graph and replayed with new routing and slots, against the torch reference."""
    from tests.kernels.moe_lora_gpu_cases import check_pair_graph_replay

    monkeypatch.setattr(op, "PAIR_KERNEL", 1)
    check_pair_graph_replay(128, M, w2)


@pytest.mark.parametrize("c", [Case(3, 2, 8, 8, 64, dtype=F16, K=600, N=72),  # 6 pairs x 8 <= 8 x 8 slots
                               Case(4, 3, 5, 3, 32, S=1, per_pair_x=True, mul_w=True, K=1100, N=40, dtype=BF16)],
                         ids=_id)
def test_pair_kernel_at_the_wide_rank_gpu_tiles(device, c, monkeypatch):
    """``moe_lora_pair_kernel`` at the tiles the GPU heuristic gives at ranks 32 / 64 (``WIDE_RANK_PAIR_TILES``:
    K tiles of 512, so K 600 / 1100 end in a partial tile) against the fp64 reference."""
    from vllm.lora.ops.triton_ops import moe_lora_config as mc

    monkeypatch.setattr(op, "PAIR_KERNEL", 0)
    cfg = mc._gpu_config("fused", c.M * c.top_k, c.E, c.L, c.R, c.K, c.N, c.S)
    assert (cfg.block_size_k, cfg.num_warps, cfg.num_stages) == (512, 8, 2)
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    start = out.clone()
    op.fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, config=cfg, **kw, **geo)
    check(c, out, start, delta, parent)


@pytest.mark.cuda
@pytest.mark.parametrize("w2", [False, True], ids=["w13", "w2"])
@pytest.mark.parametrize("R", [32, 64])
@pytest.mark.parametrize("M", [1, 2, 8, 16])
def test_pair_path_at_wide_ranks_realistic_sizes(M, R, w2):
    """The small-batch path as the engine runs it at ranks 32 / 64 (the default kernel choice and the GPU
    heuristic's tiles), Qwen3-30B-A3B widths, against the torch reference."""
    from tests.kernels.moe_lora_gpu_cases import _gpu_layer
    from vllm.lora.ops.torch_ops.moe_lora import fused_moe_lora_torch

    x, lora_a, lora_b, out, kw, top_k_in, g = _gpu_layer(128, R, M, BF16, w2)
    expected = out.float()
    fused_moe_lora_torch(expected, x, lora_a, lora_b, top_k_in=top_k_in, **kw)
    op.fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, **kw)
    torch.cuda.synchronize()
    assert_close(out.float(), expected, BF16)
