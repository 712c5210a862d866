"""Programmatic dependent launch (``vllm/platforms/pdl.py``, ``ops/_pdl.py``): when a launch uses it, that every
PDL-aware kernel waits for the previous kernel before its first memory access (its source, and its sm_90 PTX),
and on a GPU that a chain of dependent kernels replayed in a CUDA graph with PDL gives the bits of plain
eager launches."""
from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest
import torch

from vllm.platforms import pdl

# Every Triton kernel the decode path launches (and their split / reduce companions): module, kernel name.
PDL_KERNELS = [
    ("vllm.attention._decode_split_kernel", "decode_split_kernel"),
    ("vllm.attention._decode_split_kernel", "decode_reduce_kernel"),
    ("vllm.attention._paged_attention_kernel", "paged_attention_kernel"),
    ("vllm.attention._paged_attention_kernel", "write_kv_kernel"),
    ("vllm.lora.ops.triton_ops._lora_linear_kernels", "lora_linear_token_kernel"),
    ("vllm.lora.ops.triton_ops._lora_linear_kernels", "lora_linear_sorted_kernel"),
    ("vllm.lora.ops.triton_ops._lora_linear_kernels", "lora_linear_token_prefetch_kernel"),
    ("vllm.lora.ops.triton_ops._lora_linear_split_kernels", "lora_linear_split_shrink_kernel"),
    ("vllm.lora.ops.triton_ops._lora_linear_split_kernels", "lora_linear_split_expand_kernel"),
    ("vllm.lora.ops.triton_ops._fused_moe_lora_kernels", "moe_lora_sorted_kernel"),
    ("vllm.lora.ops.triton_ops._fused_moe_lora_kernels", "moe_lora_pair_kernel"),
    ("vllm.lora.ops.triton_ops._moe_lora_pair_prefetch_kernel", "moe_lora_pair_prefetch_kernel"),
    ("vllm.model_executor.layers.ops._rms_norm_kernel", "_rms_norm_kernel"),
    ("vllm.model_executor.layers.ops._qk_norm_rope_kernel", "_qk_norm_rope_kernel"),
    ("vllm.model_executor.layers.ops._dense_gemv_kernel", "dense_gemv_kernel"),
    ("vllm.model_executor.layers.ops._dense_gemv_kernel", "dense_gemv_delayed_kernel"),
    ("vllm.model_executor.layers.fused_moe.router._topk_softmax_kernel", "_topk_softmax_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._moe_align_kernel", "_count_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._moe_align_kernel", "_scan_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._moe_align_kernel", "_scatter_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._moe_align_kernel", "_count2_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._moe_align_kernel", "_scan2_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._moe_align_kernel", "_scatter2_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._fused_moe_gemm_kernel", "_fused_moe_gemm_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._fused_moe_gemv_kernel", "_fused_moe_gemv_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._activation_kernel", "_moe_activation_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._moe_sum_kernel", "_moe_sum_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._int4_gemv_kernel", "_int4_gemv_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._int4_gemv_rows_kernel", "_int4_gemv_rows_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_kernel", "_int4_moe_gemm_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_kernel", "_split_k_reduce_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_swap_kernel", "_int4_moe_gemm_swap_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._mxfp4_gemv_kernel", "_mxfp4_gemv_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._mxfp4_moe_gemm_kernel", "_mxfp4_moe_gemm_kernel"),
    ("vllm.model_executor.layers.fused_moe.ops._mxfp4_moe_gemm_kernel", "_mxfp4_split_k_reduce_kernel"),
]


@pytest.fixture
def fresh_pdl(monkeypatch):
    pdl.reset_pdl_cache()
    yield monkeypatch
    pdl.reset_pdl_cache()


def test_off_on_cpu_and_under_the_interpreter(fresh_pdl):
    assert pdl.pdl_launch_kwargs(torch.device("cpu")) == {"USE_PDL": False}
    fresh_pdl.setenv("TRITON_INTERPRET", "1")
    assert not pdl.pdl_enabled(torch.device("cuda", 0))


@pytest.mark.parametrize("capability,env,expected", [
    ((9, 0), None, True), ((10, 0), "1", True), ((9, 0), "0", False), ((8, 9), None, False)])
def test_on_for_sm90_unless_turned_off(fresh_pdl, capability, env, expected):
    fresh_pdl.setenv("TRITON_INTERPRET", "0")
    fresh_pdl.setattr(torch.cuda, "is_available", lambda: True)
    fresh_pdl.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    fresh_pdl.setattr(pdl, "_triton_has_pdl", lambda: True)
    if env is None:
        fresh_pdl.delenv("VLLM_PDL", raising=False)
    else:
        fresh_pdl.setenv("VLLM_PDL", env)
    kwargs = pdl.pdl_launch_kwargs(torch.device("cuda", 0))
    assert kwargs == ({"USE_PDL": True, "launch_pdl": True} if expected else {"USE_PDL": False})


def test_a_bad_env_value_is_refused(fresh_pdl):
    fresh_pdl.setenv("TRITON_INTERPRET", "0")
    fresh_pdl.setattr(torch.cuda, "is_available", lambda: True)
    fresh_pdl.setenv("VLLM_PDL", "maybe")
    with pytest.raises(ValueError, match="VLLM_PDL"):
        pdl.pdl_enabled(torch.device("cuda", 0))


# Kernels that load weights (never written by a kernel during a step) before the wait, or compute indices there:
# arguments they may touch before it.
# The dense LoRA handoff (ops/pending_delta.py): the row's slot in the step's mapping (copied in before the step's
# first kernel) and the adapters' A / B tiles; the rows and the shrink's partial sums only after the wait.
_HANDOFF_B = {"dmap_ptr", "d_loras", "d_rank", "db_ptr", "stride_dbs", "stride_dbl", "stride_dbn", "stride_dbr"}
_HANDOFF_A = {"n_norm", "smap_ptr", "s_loras", "s_rank", "s_slices", "s_splits", "sa_ptr", "stride_sas", "stride_sal",
              "stride_sar", "stride_sak"}
WEIGHTS_BEFORE_WAIT = {"dense_gemv_kernel": {"w_ptr", "N", "K", "stride_wn", "n_tiles"} | _HANDOFF_A - {"n_norm"},
                       # its q head group; the handoff's q/k/v delta: the token's slot (t < n_tokens), B rows
                       "_qk_norm_rope_kernel": {"n_tokens", "q_heads"} | _HANDOFF_B,
                       # the split attention: program ids and its block-table row's address (no load)
                       "decode_split_kernel": {"block_tables_ptr", "stride_bt_b"},
                       "decode_reduce_kernel": set(),  # program ids and aranges only: no argument
                       # the handoff's shrink programs (row < n_rows) and the o delta's slot and B rows
                       "_rms_norm_kernel": {"n_rows"} | _HANDOFF_A | _HANDOFF_B,
                       # the dense LoRA prefetch kernel: its slice's width and first column, its rank mask (no load)
                       "lora_linear_token_prefetch_kernel": {"n0", "n1", "n2", "off0", "off1", "off2", "R"}}


@pytest.mark.parametrize("module,name", PDL_KERNELS, ids=[n for _, n in PDL_KERNELS])
def test_kernel_waits_before_anything_else(module, name):
    """A kernel launched with PDL may run beside the previous one: it must wait before touching anything another
    kernel writes (its first statement, or after loading only its weights)."""
    kernel = getattr(importlib.import_module(module), name)
    assert "USE_PDL" in kernel.arg_names, f"{name} takes no USE_PDL"
    fn = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn))).body[0]
    body = [ast.unparse(s) for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    assert "pdl_wait(USE_PDL)" in body, f"{name} never waits"
    before = body[:body.index("pdl_wait(USE_PDL)")]
    allowed = WEIGHTS_BEFORE_WAIT.get(name, set())
    assert bool(before) == (name in WEIGHTS_BEFORE_WAIT), f"{name} starts with {before[:1]}"
    if before:
        names = {n.id for s in before for n in ast.walk(ast.parse(s)) if isinstance(n, ast.Name)}
        touched = names & set(kernel.arg_names) - allowed - {n for n in kernel.arg_names if n.isupper()}
        assert not touched, f"{name} uses {sorted(touched)} before its wait"


def test_sm90_ptx_waits_before_its_first_global_access():
    """Compiled for sm_90 with USE_PDL, the wait and the trigger come before the first global load or store
    (a subprocess without the interpreter: tests/kernels/pdl_hopper_compile.py)."""
    from tests.utils import run_without_interpreter

    assert run_without_interpreter("tests/kernels/pdl_hopper_compile.py").count("ok ") == 6


@pytest.mark.cuda
def test_dependent_chain_in_a_graph_matches_plain_launches(fresh_pdl):
    """norm -> GEMV -> residual norm -> GEMV -> top-k -> sum, each reading the one before: replayed in a CUDA
    graph with PDL (and run eagerly with it) it gives the bits of the same chain launched plainly."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from vllm.model_executor.layers.fused_moe.ops.moe_sum import moe_sum
    from vllm.model_executor.layers.fused_moe.router.fused_topk import fused_topk
    from vllm.model_executor.layers.ops.dense_gemv import dense_gemv
    from vllm.model_executor.layers.ops.rms_norm import fused_add_rms_norm, rms_norm

    dev, dt, H, E, K = torch.device("cuda"), torch.bfloat16, 2048, 128, 8
    gen = torch.Generator(device=dev).manual_seed(3)
    w_norm = torch.rand(H, device=dev, generator=gen).to(dt) + 0.5
    w1 = (torch.randn(H, H, device=dev, generator=gen) / H ** 0.5).to(dt)
    w_router = (torch.randn(E, H, device=dev, generator=gen) / H ** 0.5).to(dt)
    w_out = (torch.randn(K * H, H, device=dev, generator=gen) / H ** 0.5).to(dt)

    def chain(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = rms_norm(x, w_norm, 1e-6)
        a = dense_gemv(h, w1)
        h2, res = fused_add_rms_norm(a, x, w_norm, 1e-6)
        weights, ids = fused_topk(dense_gemv(h2, w_router).float(), K, renormalize=True)
        y = moe_sum(dense_gemv(h2, w_out).view(1, K, H), torch.empty(1, H, device=dev, dtype=dt))
        return res, weights, ids, y

    inputs = [torch.randn(1, H, device=dev, generator=gen).to(dt) for _ in range(20)]
    fresh_pdl.setenv("VLLM_PDL", "0")
    pdl.reset_pdl_cache()
    plain = [chain(x) for x in inputs]
    fresh_pdl.setenv("VLLM_PDL", "1")
    pdl.reset_pdl_cache()
    if not pdl.pdl_enabled(dev):
        pytest.skip("PDL needs sm_90+ and a Triton with launch_pdl")
    eager = [chain(x) for x in inputs]
    static_x = inputs[0].clone()
    chain(static_x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_x)
    for x, ref, got in zip(inputs, plain, eager):
        static_x.copy_(x)
        graph.replay()
        for r, g, s in zip(ref, got, static_out):
            assert torch.equal(r, g)
            assert torch.equal(r, s)
