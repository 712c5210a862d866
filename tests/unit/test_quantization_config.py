"""The quantization entry point: which checkpoints are refused, and the int4 reference dequantiser."""
import pytest
import torch

from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.layers.quantization.int4 import Int4Weight


class _Cfg:
    def __init__(self, quant=None):
        if quant is not None:
            self.quantization_config = quant


def test_float_checkpoint_has_no_quant_config():
    assert get_quantization_config(_Cfg()) is None


def test_requested_quantization_on_float_checkpoint_is_refused():
    with pytest.raises(ValueError, match="no quantization_config"):
        get_quantization_config(_Cfg(), "gptq")


def test_requested_quantization_must_match_checkpoint():
    with pytest.raises(ValueError, match="quantized with 'awq'"):
        get_quantization_config(_Cfg({"quant_method": "awq"}), "gptq")


def test_unknown_method_names_the_supported_ones():
    with pytest.raises(ValueError, match="'bitsandbytes' is not supported; supported: gptq"):
        get_quantization_config(_Cfg({"quant_method": "bitsandbytes"}))


def test_int4_dequantize_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    out, inp, gs = 6, 16, 4
    q = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    scales = torch.rand(out, inp // gs, generator=g) + 0.1
    zeros = torch.randint(0, 17, (out, inp // gs), generator=g, dtype=torch.uint8)
    g_idx = torch.randperm(inp, generator=g) // gs
    w = Int4Weight(q, scales, zeros, gs, g_idx.to(torch.int32)).dequantize()
    for o in range(out):
        for i in range(inp):
            grp = int(g_idx[i])
            assert w[o, i] == scales[o, grp] * (int(q[o, i]) - int(zeros[o, grp]))
    sym = Int4Weight(q, scales, None, gs).dequantize()
    assert sym[1, 5] == scales[1, 5 // gs] * (int(q[1, 5]) - 8)


def test_int4_group_size_must_divide_input():
    with pytest.raises(ValueError, match="does not divide the input dimension 10"):
        Int4Weight(torch.zeros(2, 10, dtype=torch.uint8), torch.ones(2, 2), None, 4)
