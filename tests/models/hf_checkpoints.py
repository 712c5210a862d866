"""Tiny random MoE checkpoints made with transformers, and a paged runner for our models.

``make_checkpoint(arch, folder)`` builds a float32 model of the architecture
with every weight re-drawn (norms around 1, biases, routers and heads large
enough that routing and greedy choices are far from ties), saves it with
``save_pretrained`` and returns the transformers model (eval, eager attention).

``PagedRunner`` drives one of our models the way the engine does: a KV cache
per layer, block tables, ``build_metadata`` and ``set_forward_context``.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vllm.attention import allocate_kv_cache, build_metadata
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import bind_kv_cache

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
              intermediate_size=96, max_position_embeddings=128, num_experts_per_tok=2, rms_norm_eps=1e-6,
              eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)

ARCHS = {
    # layer 0 dense (mlp_only_layers), layer 1 sparse; explicit head_dim; renormalised top-k
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True, mlp_only_layers=[0]),
    # shared expert with its sigmoid gate, qkv bias, plain top-k weights
    "qwen2_moe": dict(num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    # q/k norm over all heads
    "olmoe": dict(num_experts=8),
    # block_sparse_moe on disk
    "mixtral": dict(num_local_experts=4),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run a test module with one intra-op thread (import this fixture into the module to apply it).

    These tensors are tiny; on a 2-core machine that is busy with other work, OpenMP's
    thread hand-off made each small matmul ~24 ms instead of ~5 us (measured).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_kernels_on_gpu(model: torch.nn.Module) -> None:
    """A model on a CUDA device runs TritonExperts, the Triton attention and (with LoRA) the GPU Punica wrapper."""
    from vllm.model_executor.layers.attention import attention_layers
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE

    moe = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert moe and all(m.moe_backend.value == "triton" for m in moe), [m.moe_backend for m in moe]
    assert all(a.backend == "triton" for a in attention_layers(model)), [a.backend for a in attention_layers(model)]


def hf_config(arch: str, **overrides):
    return AutoConfig.for_model(arch, **{**COMMON, **ARCHS[arch], **overrides})


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            std, mean = 0.2, 1.0
        elif p.dim() == 1:  # biases
            std, mean = 0.1, 0.0
        elif name.endswith("mlp.gate.weight") or "embed" in name or "lm_head" in name:
            std, mean = 0.5, 0.0  # routers and vocab: well-separated choices
        else:
            std, mean = 0.08, 0.0
        p.copy_(torch.randn(p.shape, generator=g) * std + mean)


def make_checkpoint(arch: str, folder, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32,
                                             attn_implementation="eager")
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model


class PagedRunner:
    """Prefill a batch, then decode it one token per sequence per step, through a paged KV cache."""

    def __init__(self, model: torch.nn.Module, *, num_kv_heads: int, head_dim: int, num_layers: int,
                 num_seqs: int, block_size: int = 4, blocks_per_seq: int = 8) -> None:
        self.model, self.block_size = model, block_size
        num_blocks = num_seqs * blocks_per_seq + 1
        weight = next(model.parameters())
        self.device = weight.device
        bind_kv_cache(model, [allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, weight.dtype,
                                                self.device) for _ in range(num_layers)])
        # scattered, interleaved blocks (block 0 unused) so that paging is exercised
        self.tables = [[1 + b + num_seqs * j for j in range(blocks_per_seq)] for b in range(num_seqs)][::-1]
        self.lens = [0] * num_seqs

    def _step(self, tokens: list[list[int]]) -> torch.Tensor:
        q_lens = [len(t) for t in tokens]
        seq_lens = [n + q for n, q in zip(self.lens, q_lens)]
        ids = torch.tensor([t for seq in tokens for t in seq], dtype=torch.long, device=self.device)
        pos = torch.tensor([p for n, q in zip(self.lens, q_lens) for p in range(n, n + q)], dtype=torch.long,
                           device=self.device)
        meta = build_metadata(q_lens, seq_lens, self.tables, self.block_size, self.device)
        with torch.no_grad(), set_forward_context(meta):
            logits = self.model.compute_logits(self.model(ids, pos))
        self.lens = seq_lens
        return logits

    def prefill(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits [len, V] of every prompt."""
        return list(self._step(prompts).split([len(p) for p in prompts]))

    def decode(self, last_tokens: list[int]) -> torch.Tensor:
        """Logits [num_seqs, V] of one new token per sequence."""
        return self._step([[t] for t in last_tokens])


def check_paged_greedy_against_hf(runner: "PagedRunner", hf, prompts: list[list[int]], new_tokens: int,
                                  label: str = "") -> None:
    """Prefill ``prompts`` through the paged runner, decode ``new_tokens`` greedily; prefill logits, tokens
    and each decode step's logits equal transformers' (``generate`` with its logits)."""
    from tests.utils import assert_close

    prefill = [lg.cpu() for lg in runner.prefill(prompts)]
    with torch.no_grad():
        for prompt, got in zip(prompts, prefill):
            assert_close(got, hf(torch.tensor([prompt])).logits[0], torch.float32, name=f"{label} prefill logits")
    ours = [[int(lg[-1].argmax())] for lg in prefill]
    steps = []
    for _ in range(new_tokens - 1):
        logits = runner.decode([seq[-1] for seq in ours]).cpu()
        steps.append(logits)
        for seq, row in zip(ours, logits):
            seq.append(int(row.argmax()))
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert out.sequences[0, len(prompt):].tolist() == ours[b], f"{label} sequence {b}: greedy tokens differ"
        ref = torch.stack([lg[0] for lg in out.logits[1:]])
        assert_close(torch.stack([lg[b] for lg in steps]), ref, torch.float32, name=f"{label} decode logits")
