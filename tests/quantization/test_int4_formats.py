"""Each int4 format decoded to ``Int4Weight``, bit for bit against the format.

compressed-tensors: against the library itself (``PackedQuantizationCompressor``, packing helpers).
GPTQ and AWQ: their libraries (gptqmodel, auto-gptq, autoawq) do not install on a CPU machine with
this torch / transformers (sdists pinned to CUDA builds or to transformers 4), so the packing side
is written independently in ``int4_checkpoints.py`` from FACTS.md 10 and anchored here by
hand-computed words.
"""
import pytest
import torch

from tests.quantization.int4_checkpoints import (pack_awq, pack_compressed_tensors, pack_gptq, random_int4,
                                                 reference_dequantize)
from vllm.model_executor.layers.quantization.awq import AWQConfig
from vllm.model_executor.layers.quantization.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.gptq import GPTQConfig

OUT, IN = 24, 64


def gptq(**kw):
    return GPTQConfig.from_config({"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False,
                                   "sym": True, **kw})


def awq(**kw):
    return AWQConfig.from_config({"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True,
                                  "version": "gemm", **kw})


def ct(weights=None, **kw):
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16, **(weights or {})}
    return CompressedTensorsConfig.from_config({"quant_method": "compressed-tensors", "format": "pack-quantized",
                                                "config_groups": {"g": {"targets": ["Linear"], "weights": w}}, **kw})


def decode(cfg, tensors, name="model.layers.0.self_attn.q_proj"):
    return cfg.decode(name, tensors, cfg.module_scheme(name))


# ---- the test packers against hand-computed words (FACTS.md 10) -----------------------------
def test_packers_match_hand_computed_words():
    q = torch.arange(8).repeat(8, 1)  # [8, 8]: row o has codes 0..7 along the input
    raw = random_int4(8, 8, 8, asym=True)
    raw.q, raw.zeros = q, torch.arange(8).unsqueeze(1)  # zeros [8 outputs, 1 group]: 0..7
    g = pack_gptq(raw)
    assert g["qweight"].shape == (1, 8) and int(g["qweight"][0, 0]) == 0x76543210
    # qzeros store zero - 1: zeros 0..7 -> 15, 0, 1, .., 6 -> 0x6543210F
    assert int(g["qzeros"][0, 0]) == 0x6543210F
    raw.q = torch.arange(8).repeat(8, 1).t()  # column o holds code o: AWQ packs along the outputs
    a = pack_awq(raw)
    assert int(a["qweight"][0, 0]) == 0x75316420 and int(a["qzeros"][0, 0]) == 0x75316420
    raw.q = torch.full((8, 8), 15)
    assert int(pack_compressed_tensors(raw)["weight_packed"][0, 0]) == -1  # 0xFFFFFFFF


# ---- GPTQ -----------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [16, 32, -1])
@pytest.mark.parametrize("asym,act_order", [(False, False), (True, False), (False, True), (True, True)])
def test_gptq_decode(group_size, asym, act_order):
    gs = IN if group_size == -1 else group_size
    raw = random_int4(OUT, IN, gs, asym=asym, act_order=act_order, seed=gs + 2 * asym + act_order)
    w = decode(gptq(group_size=group_size, sym=not asym, desc_act=act_order), pack_gptq(raw))
    assert torch.equal(w.q, raw.q.to(torch.uint8)) and w.group_size == gs
    assert torch.equal(w.scales, raw.scales)
    if asym:
        assert torch.equal(w.zeros.long(), torch.where(raw.zeros == 0, 16, raw.zeros))
    else:
        assert w.zeros is None
    permuted = act_order and group_size != -1  # with one group, every g_idx is the plain one (all 0)
    assert (w.g_idx is not None) == permuted
    if permuted:
        assert torch.equal(w.g_idx.long(), raw.g_idx)
    assert torch.equal(w.dequantize(), reference_dequantize(raw, "gptq"))
    assert w.dequantize().dtype == torch.float16


def test_gptq_zero_0_is_stored_as_15_and_read_as_16():
    raw = random_int4(OUT, IN, 16, asym=True)
    raw.zeros[:, 1] = 0
    tensors = pack_gptq(raw)
    assert bool((tensors["qzeros"][1] == -1).all())  # words 0xFFFFFFFF
    w = decode(gptq(sym=False), tensors)
    assert bool((w.zeros[:, 1] == 16).all())
    expected = raw.scales[:, 1:2].float() * (raw.q[:, 16:32] - 16).float()
    assert torch.equal(w.dequantize()[:, 16:32], expected.half())


def test_gptq_checks_weights_against_config():
    raw = random_int4(OUT, IN, 16, asym=True, act_order=True)
    with pytest.raises(ValueError, match="sym is true but its qzeros are not all 8"):
        decode(gptq(desc_act=True), pack_gptq(raw))
    with pytest.raises(ValueError, match="g_idx is permuted .act-order. but desc_act is false"):
        decode(gptq(sym=False), pack_gptq(raw))
    t = pack_gptq(raw)
    t["g_idx"] = t["g_idx"] + 4
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 4\)"):
        decode(gptq(sym=False, desc_act=True), t)


# ---- AWQ ------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [16, 64, -1])
def test_awq_decode(group_size):
    gs = IN if group_size == -1 else group_size
    raw = random_int4(OUT, IN, gs, asym=True, seed=gs)
    w = decode(awq(group_size=group_size), pack_awq(raw))
    assert torch.equal(w.q, raw.q.to(torch.uint8)) and torch.equal(w.zeros, raw.zeros.to(torch.uint8))
    assert w.g_idx is None and torch.equal(w.scales, raw.scales)
    assert torch.equal(w.dequantize(), reference_dequantize(raw))


# ---- compressed-tensors, against the library -------------------------------------------------
ct_lib = pytest.importorskip("compressed_tensors")


def _scheme(symmetric, strategy, group_size):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy=strategy, group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=args), args


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy,group_size,inp", [("group", 16, 64), ("group", 12, 60), ("channel", None, 64)])
def test_compressed_tensors_matches_the_library(dtype, symmetric, strategy, group_size, inp):
    """The library compresses a random weight; our decode of its tensors dequantises to exactly the
    library's decompression; and the test packer writes the library's words."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor as Compressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    scheme, args = _scheme(symmetric, strategy, group_size)
    out, G = 20, inp // group_size if group_size else 1
    g = torch.Generator().manual_seed(inp + symmetric)
    state = {"weight": (torch.randn(out, inp, generator=g) * 0.05).to(dtype),
             "weight_scale": (torch.rand(out, G, generator=g) * 0.01 + 0.005).to(dtype)}
    if not symmetric:
        state["weight_zero_point"] = torch.randint(-8, 8, (out, G), generator=g, dtype=torch.int8)
    packed = Compressor.compress(state, scheme)
    cfg = ct(weights=args.model_dump())
    w = decode(cfg, dict(packed))
    reference = Compressor.decompress(dict(packed), scheme)["weight"]
    assert w.dequantize().dtype == reference.dtype == dtype
    assert torch.equal(w.dequantize(), reference)
    # the test's own packer writes the same words as the library
    raw = random_int4(out, inp, inp // G, asym=not symmetric, seed=3)
    ours = pack_compressed_tensors(raw)
    assert torch.equal(ours["weight_packed"], pack_to_int32((raw.q - 8).to(torch.int8), 4))
    if not symmetric:
        assert torch.equal(ours["weight_zero_point"], pack_to_int32((raw.zeros - 8).to(torch.int8), 4, packed_dim=0))


def test_compressed_tensors_actorder_group_reads_weight_g_idx():
    """compressed-tensors 0.20 no longer writes actorder "group"; older checkpoints store weight_g_idx."""
    raw = random_int4(OUT, IN, 16, asym=True, act_order=True, scale_dtype=torch.bfloat16)
    cfg = ct(weights={"symmetric": False, "actorder": "group"})
    w = decode(cfg, pack_compressed_tensors(raw))
    assert torch.equal(w.g_idx.long(), raw.g_idx)
    assert torch.equal(w.dequantize(), reference_dequantize(raw))
    assert ct(weights={"actorder": "weight"}).module_scheme("x").act_order is False


# ---- refusals -------------------------------------------------------------------------------------
def test_group_size_that_does_not_divide_the_input_is_refused():
    raw = random_int4(OUT, 48, 16, asym=True)  # 48 inputs: group 32 does not divide it
    with pytest.raises(ValueError, match="GPTQ module 'model.layers.0.self_attn.q_proj': group size 32 does not "
                                         "divide the input dimension 48"):
        decode(gptq(group_size=32, sym=False), pack_gptq(raw))
    with pytest.raises(ValueError, match="AWQ module .*group size 32 does not divide the input dimension 48"):
        decode(awq(group_size=32), pack_awq(raw))
    with pytest.raises(ValueError, match="compressed-tensors module .*group size 32 does not divide the input "
                                         "dimension 48"):
        decode(ct(weights={"group_size": 32, "symmetric": False}), pack_compressed_tensors(raw))


@pytest.mark.parametrize("make,match", [
    (lambda: gptq(bits=8), "GPTQ checkpoint has bits=8: only 4-bit GPTQ"),
    (lambda: gptq(bits=3), "GPTQ checkpoint has bits=3: only 4-bit GPTQ"),
    (lambda: gptq(dynamic={r"+:.*down_proj": {"bits": 8}}), r"GPTQ checkpoint \(dynamic override .*bits=8"),
    (lambda: awq(bits=8), "AWQ checkpoint has bits=8: only 4-bit AWQ"),
    (lambda: ct(weights={"num_bits": 8}), "num_bits=8: only 4-bit int weights .* 'pack-quantized'"),
])
def test_bits_other_than_4_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make,match", [
    (lambda: gptq(checkpoint_format="gptq_v2"), "GPTQ checkpoint_format 'gptq_v2' is not supported: only 'gptq'"),
    (lambda: gptq(checkpoint_format="marlin"), "GPTQ checkpoint_format 'marlin' is not supported"),
    (lambda: awq(version="gemv"), "AWQ version 'gemv' is not supported: only 'gemm'"),
    (lambda: awq(zero_point=False), "zero_point: false"),
    (lambda: ct(format="int-quantized"), "format 'int-quantized' is not supported: only 'pack-quantized'"),
    (lambda: ct(format="float-quantized"), "format 'float-quantized' is not supported"),
    (lambda: ct(weights={"strategy": "tensor"}), "strategy 'tensor' is not supported"),
    (lambda: ct(weights={"type": "float"}), "weight type 'float' is not supported"),
    (lambda: ct(quantization_status="frozen"), "quantization_status 'frozen'"),
    (lambda: ct(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity"),
])
def test_unsupported_checkpoint_formats_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_weight_and_activation_schemes_are_refused():
    cfg = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}}
    with pytest.raises(ValueError, match="quantizes input_activations: only weight-only quantization .W4A16."):
        CompressedTensorsConfig.from_config(cfg)


# ---- which modules are quantized -------------------------------------------------------------------
def test_gptq_dynamic_exclusions_and_overrides():
    cfg = gptq(dynamic={r"-:.*\.experts\.3\..*": {}, r"+:.*down_proj": {"group_size": 32, "desc_act": True},
                        r"-:.*down_proj": {}})
    assert cfg.module_scheme("model.layers.0.mlp.experts.3.gate_proj") is None
    down = cfg.module_scheme("model.layers.0.mlp.experts.1.down_proj")  # the first matching rule wins
    assert (down.group_size, down.act_order, down.has_zeros) == (32, True, False)
    assert cfg.module_scheme("model.layers.0.self_attn.q_proj").group_size == 16
    # re.match: anchored at the start of the name
    assert gptq(dynamic={"-:experts": {}}).module_scheme("model.layers.0.mlp.experts.0.up_proj") is not None


def test_awq_modules_to_not_convert_are_substrings():
    cfg = awq(modules_to_not_convert=["shared_expert", "self_attn.o_proj"])
    assert cfg.module_scheme("model.layers.1.mlp.shared_expert.gate_proj") is None
    assert cfg.module_scheme("model.layers.1.self_attn.o_proj") is None
    assert cfg.module_scheme("model.layers.1.self_attn.q_proj").has_zeros


def test_compressed_tensors_targets_and_ignore():
    cfg = ct(ignore=["lm_head", r"re:.*mlp\.gate$"])
    assert cfg.module_scheme("lm_head") is None and cfg.module_scheme("model.layers.0.mlp.gate") is None
    assert cfg.module_scheme("model.layers.0.mlp.gate_proj") is not None
    only = CompressedTensorsConfig.from_config({
        "quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
            "experts": {"targets": [r"re:.*experts\.\d+\..*"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}},
            "rest": {"targets": ["model.layers.0.self_attn.q_proj"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}}}})
    assert only.module_scheme("model.layers.0.mlp.experts.2.down_proj").has_zeros
    assert only.module_scheme("model.layers.0.self_attn.q_proj").group_size == -1
    assert only.module_scheme("model.layers.0.self_attn.k_proj") is None
    with pytest.raises(ValueError, match="names a module class: only 'Linear'"):
        ct(ignore=["Qwen3MoeSparseMoeBlock"])
