"""The int4 (W4A16) grouped GEMM against an fp32 reference built from Int4Weight.dequantize
(independent of the packing), in every layout the repack produces."""
import dataclasses

import pytest
import torch

from tests.quantization.int4_moe_setup import random_int4
from tests.utils import assert_close, run_without_interpreter
from vllm.model_executor.layers.fused_moe.int4_fused_moe_method import Int4MoEMethod
from vllm.model_executor.layers.fused_moe.int4_weights import pack_int4_k, unpack_int4_k
from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import (
    get_int4_moe_config,
    int4_moe_gemm_reference,
    invoke_int4_moe_gemm,
)
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size


def test_pack_unpack_roundtrip():
    q = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    words = pack_int4_k(q)
    assert words.dtype == torch.int32 and words.shape == (3, 5, 8)
    assert torch.equal(unpack_int4_k(words), q)
    # code c of word j is q[..., 8j + c] in bits 4c..4c+3 (the top code sets the sign bit)
    one = torch.zeros(1, 8, dtype=torch.uint8)
    one[0, 7], one[0, 1] = 15, 3
    assert int(pack_int4_k(one)[0, 0]) == (15 << 28 | 3 << 4) - 2**32
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4_k(torch.zeros(2, 12, dtype=torch.uint8))


def _packed(ws, group_size, has_zeros, act_order, device):
    """Pack a list of Int4Weight (one per expert) as Int4MoEMethod does (its _pack)."""
    from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight

    q = torch.stack([w.q for w in ws]).to(device)
    s = torch.stack([w.scales for w in ws]).to(device)
    z = torch.stack([w.zeros for w in ws]).to(device) if has_zeros else None
    g = torch.stack([w.group_index() for w in ws]).to(torch.int32).to(device) if act_order else None
    packed, scales, zeros, g_idx, perm = Int4MoEMethod._pack(q, s, z, g, group_size)
    assert tuple(packed.shape) == (len(ws), q.shape[2] // 8, q.shape[1])  # [E, K/8, N]
    return Int4PackedWeight(packed, scales, zeros, group_size, g_idx, perm)


# (rows, top_k, E, N, K, group, has_zeros, act_order, general g_idx, split_k, block_k)
CASES = [
    (5, 2, 4, 48, 64, 32, False, False, False, 1, None),
    (9, 2, 4, 64, 64, 16, True, False, False, 1, 32),  # groups smaller than the K-tile
    (9, 1, 3, 32, 48, 16, True, False, False, 1, 32),  # uneven K tail
    (7, 2, 4, 40, 64, 32, True, True, False, 1, None),  # act-order: perm, plain groups after the sort
    (7, 2, 4, 40, 64, 16, False, True, True, 2, 16),  # act-order with uneven groups (a TP slice): g_idx kept
    (6, 2, 4, 32, 128, 32, True, False, False, 4, 16),  # split-K
    # one scale group per 128-wide K-tile (where UNPACK 3 runs; elsewhere it runs 0)
    (5, 2, 4, 32, 256, 128, True, True, False, 2, 128),  # act-order (perm), zero points, split-K
    (4, 2, 4, 48, 384, 128, False, False, False, 1, 128),  # symmetric, an N tail
]


@pytest.mark.parametrize("unpack", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("routing", ["sorted", "unsorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,top_k,E,N,K,group,has_zeros,act_order,general,split,bk", CASES)
def test_int4_gemm_matches_dequantized_reference(rows, top_k, E, N, K, group, has_zeros, act_order, general, split,
                                                 bk, dtype, routing, unpack, device):
    gen = torch.Generator().manual_seed(rows * 7 + K)
    ws = [random_int4(N, K, group, has_zeros, act_order, gen) for _ in range(E)]
    if general:  # a TP slice of an act-order w2: every channel's group drawn at random (uneven groups)
        for w in ws:
            w.g_idx = torch.randint(0, K // group, (K,), generator=gen, dtype=torch.int32)
    pw = _packed(ws, group, has_zeros, act_order, device)
    assert (pw.g_idx is not None) == general and (pw.perm is not None) == act_order
    a = torch.randn(rows, K, generator=gen).to(dtype=dtype, device=device)
    ids = torch.randint(-1, E, (rows, top_k), generator=gen).to(device=device, dtype=torch.int32)
    ids[0, 0] = E - 1  # the last expert is used
    ids[ids == 1] = 0  # expert 1 gets no pair
    tw = torch.rand(rows, top_k, generator=gen).to(device)
    # the tl.dot kernel in each UNPACK mode (the GEMV, the heuristic's for unsorted launches: test_int4_gemv.py)
    cfg = get_int4_moe_config(rows * top_k, E, N, K, group, dtype, sorted_pairs=routing == "sorted", gemv=False)
    cfg = dataclasses.replace(cfg, split_k=split, unpack=unpack, **({"block_size_k": bk} if bk else {}))
    if routing == "sorted":
        al = moe_align_block_size(ids, cfg.block_size_m, E)
        route = dict(sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                     num_tokens_post_padded=al.num_tokens_post_padded)
    else:
        route = dict(pair_expert_ids=ids.reshape(-1).contiguous())
    out = torch.full((rows * top_k, N), float("nan"), dtype=dtype, device=device)  # poisoned
    split_buffer = torch.full((split * out.numel(),), float("nan"), device=device)  # poisoned too
    invoke_int4_moe_gemm(a, pw, out, top_k_in=top_k, topk_weights=tw, mul_routed_weight=True, config=cfg,
                         split_buffer=split_buffer, **route)
    # independent reference: the original (unsorted, unpacked) weights through Int4Weight.dequantize
    flat = ids.reshape(-1).long().cpu()
    ref = torch.zeros(rows * top_k, N, dtype=torch.float64)
    for p, e in enumerate(flat.tolist()):
        if e >= 0:
            ref[p] = (ws[e].dequantize(torch.float64) @ a[p // top_k].double().cpu()) * float(tw.reshape(-1)[p])
    routed = flat >= 0
    assert_close(out.cpu()[routed].float(), ref[routed], dtype)
    if split > 1:
        assert torch.equal(out.cpu()[~routed], torch.zeros_like(out.cpu()[~routed]))
    else:
        assert torch.isnan(out.cpu()[~routed]).all()  # dropped pairs are left untouched
    # the package's reference agrees with the independent one
    ref2 = int4_moe_gemm_reference(a, pw, ids, top_k_in=top_k, topk_weights=tw, mul_routed_weight=True)
    assert_close(ref2.cpu()[routed], ref[routed], torch.float32)


def test_decode_config_splits_k_to_fill_the_gpu(monkeypatch):
    import vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm as mod

    monkeypatch.setattr(mod, "triton_interpreting", lambda: False)
    # Qwen3-30B-A3B GEMM1, 1 token, the dot kernel's tiles (the heuristic runs the GEMV there)
    decode = mod.get_int4_moe_config(8, 128, 1536, 2048, 128, torch.bfloat16, gemv=False)
    assert decode.block_size_m == 16 and decode.split_k > 1
    prefill = mod.get_int4_moe_config(8 * 4096, 128, 1536, 2048, 128, torch.bfloat16)
    assert prefill.split_k == 1 and prefill.block_size_m >= 64
    # one token (its top-k experts are distinct) skips the sort; two of Mixtral's (4 pairs on 8 experts) do not
    assert mod.use_unsorted_int4_gemm(8, 128) and mod.use_unsorted_int4_gemm(2, 8)
    assert not mod.use_unsorted_int4_gemm(4, 8)
    assert not mod.use_unsorted_int4_gemm(8 * 16, 128)


def test_kernels_compile_for_hopper():
    """The CPU interpreter never compiles: compile the kernels for sm_90 in a subprocess (no GPU needed)."""
    assert run_without_interpreter("tests/kernels/int4_hopper_compile.py").count("ok ") == 42


@pytest.mark.parametrize("epilogue", ["silu", "gelu", "silu_no_mul", "gelu_no_mul", "relu2_no_mul", "top_k"])
def test_split_k_epilogues(epilogue, device):
    """The split-K reduction applying the activation (GEMM1) or the top-k sum (GEMM2) in the same launch
    equals the GEMM followed by the separate op."""
    from vllm.model_executor.layers.fused_moe.config import MoEActivation
    from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation_torch

    rows, top_k, E, N, K, group = 6, 2, 4, 64, 64, 16
    gen = torch.Generator().manual_seed(len(epilogue))
    pw = _packed([random_int4(N, K, group, True, False, gen) for _ in range(E)], group, True, False, device)
    a = torch.randn(rows, K, generator=gen).to(device)
    ids = torch.randint(0, E, (rows, top_k), generator=gen).to(device=device, dtype=torch.int32)
    tw = torch.rand(rows, top_k, generator=gen).to(device)
    cfg = dataclasses.replace(get_int4_moe_config(rows * top_k, E, N, K, group, torch.float32), split_k=2,
                              block_size_k=16)
    al = moe_align_block_size(ids, cfg.block_size_m, E)
    route = dict(sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                 num_tokens_post_padded=al.num_tokens_post_padded)
    ref = int4_moe_gemm_reference(a, pw, ids, top_k_in=top_k, topk_weights=tw, mul_routed_weight=True).cpu()
    if epilogue == "top_k":
        expected = ref.view(rows, top_k, N).sum(1)
        kw = dict(epilogue_top_k=top_k)
    else:
        act = MoEActivation(epilogue)
        expected = moe_activation_torch(act, ref)
        kw = dict(epilogue_activation=act)
    out = torch.full(tuple(expected.shape), float("nan"), device=device)
    invoke_int4_moe_gemm(a, pw, out, top_k_in=top_k, topk_weights=tw, mul_routed_weight=True, config=cfg, **kw,
                         **route)
    assert_close(out.cpu(), expected, torch.float32)
    with pytest.raises(ValueError, match="fused epilogue needs SPLIT_K > 1"):
        invoke_int4_moe_gemm(a, pw, out, top_k_in=top_k, config=dataclasses.replace(cfg, split_k=1), **kw, **route)


def test_tuned_config_file_wins(tmp_path, monkeypatch):
    """A tuned file (as benchmark_moe_int4.py --sweep --tune-out writes) overrides the heuristic."""
    from vllm.kernel_configs import clear_cache, config_file_name
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm

    key = {"E": 128, "N": 1536, "K": 2048, "G": 128, "sorted": 0}
    name = config_file_name("int4_moe_gemm", key, fused_moe_gemm._device_name())
    (tmp_path / name).write_text('{"8": {"BLOCK_SIZE_N": 64, "SPLIT_K": 2, "num_stages": 3}}')
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter has its own configs
    clear_cache()
    try:
        tuned = get_int4_moe_config(8, 128, 1536, 2048, 128, torch.bfloat16, sorted_pairs=False)
        other = get_int4_moe_config(8, 128, 1536, 2048, 128, torch.bfloat16, sorted_pairs=True, gemv=False)
    finally:
        clear_cache()
    assert (tuned.block_size_n, tuned.split_k, tuned.num_stages, tuned.block_size_m) == (64, 2, 3, 16)
    assert (other.block_size_n, other.num_stages) == (128, 4)  # no file for the sorted launch


@pytest.mark.parametrize("entry,error", [('{"8": {"BLOCK_SIZE_N": 64, "SPLITK": 2}}', r"unknown key\(s\) \['SPLITK'\]"),
                                         ('{"8": {"UNPACK": 6}}', "UNPACK=6"),
                                         ('{"8": {"BLOCK_SIZE_K": 48}}', "powers of two")])
def test_bad_tuned_entry_is_an_error_naming_the_file(tmp_path, monkeypatch, entry, error):
    """A tuned entry the GEMM cannot take is refused (with the file's name), never silently dropped."""
    from vllm.kernel_configs import clear_cache, config_file_name
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm

    key = {"E": 128, "N": 1536, "K": 2048, "G": 128, "sorted": 1}
    name = config_file_name("int4_moe_gemm", key, fused_moe_gemm._device_name())
    (tmp_path / name).write_text(entry)
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    clear_cache()
    try:
        with pytest.raises(ValueError, match=error) as exc:
            get_int4_moe_config(8, 128, 1536, 2048, 128, torch.bfloat16)
    finally:
        clear_cache()
    assert name in str(exc.value)
