"""Dense LoRA wrappers with the fused path forced on above 16 tokens (the op's tensor-core path over the
step's tokens grouped by slot), against the path off and the float64 full-weight reference.

Also: the layer hands the op the Punica wrapper's grouping of the step (made once per step), also when
the forward has more rows than the step has tokens (a CUDA-graph replay pads the batch), and none when
it has fewer.
"""
import pytest
import torch

import vllm.lora.ops.triton_ops.fused_linear_lora as fused_mod
from tests.lora.test_dense_lora_fused import build_layer, check_fused_against_unfused, check_graph_replay
from tests.utils import assert_close

# 40 tokens: slots 0-2 in runs and scattered, tokens without an adapter in between
SLOTS40 = ([0, -1, 1, 1, 2, 0, -1, 2, 1] * 4 + [2, 2, -1, 0])


@pytest.fixture
def fused_metas(monkeypatch):
    """The ``meta`` argument of every call of the fused op (the layers import it at call time)."""
    metas = []
    real = fused_mod.fused_linear_lora

    def spy(*args, **kwargs):
        metas.append(kwargs.get("meta"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_mod, "fused_linear_lora", spy)
    return metas


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,tp_size", [("replicated", 1), ("merged", 1), ("qkv", 1), ("qkv", 2), ("row", 2)])
def test_fused_matches_unfused_and_reference(kind, tp_size, dtype, fused_metas, device):
    check_fused_against_unfused(kind, tp_size, dtype, device, fused_metas, SLOTS40)
    assert all(m is not None for m in fused_metas), "the step's grouping was not handed to the op"


def test_padded_rows_and_fewer_rows(fused_metas, device):
    """More rows than the step's tokens (CUDA-graph padding: the extra rows on slot -1) with the step's
    grouping; fewer rows than tokens: the op groups the rows itself."""
    n, T = 33, 48
    slots = SLOTS40[:n] + [-1] * (T - n)
    layer, punica, x, want, _ = build_layer("qkv", 1, 0, torch.float32, device, slots, seed=1)
    layer.use_fused_decode = True
    punica.update_metadata(slots[:n])
    y = layer(x)
    assert fused_metas[-1] is not None
    assert_close(y.cpu(), want.float(), torch.float32, name="padded")
    punica.update_metadata(slots)  # the same rows, grouped from all T
    assert torch.equal(layer(x), y)
    punica.update_metadata(SLOTS40)  # 40 tokens mapped, 24 rows
    y = layer(x[:24])
    assert fused_metas[-1] is None
    assert_close(y.cpu(), want[:24].float(), torch.float32, name="fewer rows")


@pytest.mark.cuda
def test_fused_batch_layer_replays_in_a_cuda_graph(fused_metas, device):
    """Forced on (off by default, VLLM_FUSED_LORA_LINEAR); captured at 48 rows (every LoRA op on, as the graph runner does), a replay
    follows the step's mapping and grouping written in place afterwards - here a batch of 30 tokens
    padded to the 48 rows - and equals the eager forward of those rows bit for bit."""
    slots = SLOTS40 + [-1] * 8
    layer, punica, x, want, _ = build_layer("qkv", 1, 0, torch.bfloat16, device, slots)
    assert not layer.use_fused_decode  # off by default
    layer.use_fused_decode = True
    punica.update_metadata(slots)
    check_graph_replay(layer, x.clone(), [2, 1, -1, 0] * 7 + [1, 2],  # 30 tokens; rows 30..47 read slot -1
                       check_eager=lambda eager: assert_close(eager.float().cpu(), want.float(), torch.bfloat16))
    assert len(fused_metas) == 3 and all(m is not None for m in fused_metas)
