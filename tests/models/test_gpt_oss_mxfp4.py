"""gpt-oss stored with MXFP4 experts, as released (FACTS.md 3), against transformers running the
dequantised weights (transformers' own ``convert_moe_packed_tensors``), with and without LoRA.

The test writes the checkpoint: random e2m1 codes (every code, both zeros) and e8m0 scales for
``mlp.experts.{gate_up,down}_proj_{blocks,scales}``, float biases, and ``quantization_config``
``{"quant_method": "mxfp4", "modules_to_not_convert": [...]}``.  Skipped where the MXFP4 experts
(``vllm.model_executor.layers.quantization.mxfp4``) are not available.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("vllm.model_executor.layers.quantization.mxfp4")

from tests.entrypoints.lora_adapters import greedy, make_peft_adapter, peft_model  # noqa: E402
from tests.entrypoints.test_llm_gpt_oss import GREEDY, PROMPTS  # noqa: E402
from tests.entrypoints.tiny_models import char_tokenizer  # noqa: E402
from tests.models.gpt_oss_checkpoint import make_gpt_oss_checkpoint  # noqa: E402
from tests.models.hf_checkpoints import PagedRunner, single_thread  # noqa: E402,F401
from tests.utils import assert_close  # noqa: E402
from vllm import LLM  # noqa: E402
from vllm.config.model import ModelConfig  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.model_executor.model_loader import get_model  # noqa: E402


@torch.no_grad()
def _mxfp4_checkpoint(folder):
    """Save an MXFP4 gpt-oss checkpoint in ``folder``; return the float transformers model holding the
    dequantised expert weights (the reference)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    hf = make_gpt_oss_checkpoint(folder / "float", seed=3)
    g = torch.Generator().manual_seed(4)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    for name, p in hf.named_parameters():
        if not (name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj")):
            continue
        E, n_in, n_out = p.shape  # gpt-oss keeps [E, in, out]; MXFP4 rows are [out, in]
        blocks = torch.randint(0, 256, (E, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(127 - 6, 127 - 3, (E, n_out, n_in // 32), generator=g, dtype=torch.uint8)
        deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert deq.shape == p.shape
        p.copy_(deq)
        del state[name]
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
    save_file(state, str(folder / "model.safetensors"))
    config = json.loads((folder / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    char_tokenizer().save_pretrained(str(folder))
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    return folder, _mxfp4_checkpoint(folder)


def test_prefill_and_greedy_decode_match_transformers(checkpoint):
    folder, hf = checkpoint
    cfg = ModelConfig(str(folder), dtype="float32")
    model = get_model(cfg, device="cpu")
    experts = model.model.layers[0].mlp.experts
    assert experts.w13_weight.dtype == torch.uint8, "the experts stay MXFP4 in memory"
    prompts = [[3, 17, 101, 5, 64, 9, 2, 77, 120, 33, 33, 8, 45], [9, 2, 77]]
    runner = PagedRunner(model, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                         num_seqs=len(prompts))
    prefill = runner.prefill(prompts)
    ours = [[int(lg[-1].argmax())] for lg in prefill]
    with torch.no_grad():
        for prompt, got in zip(prompts, prefill):
            assert_close(got, hf(torch.tensor([prompt])).logits[0], torch.float32, name="prefill logits")
    for _ in range(7):
        for seq, row in zip(ours, runner.decode([s[-1] for s in ours])):
            seq.append(int(row.argmax()))
    for prompt, seq in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert out[0, len(prompt):].tolist() == seq


def test_mixed_lora_batch_matches_peft(checkpoint, tmp_path):
    folder, hf = checkpoint
    tok = char_tokenizer()
    adapters = [make_peft_adapter(hf, tmp_path / f"a{i}", rank=r, seed=30 + i, dense_mlp=False)
                for i, r in enumerate([8, 4])]
    llm = LLM(str(folder), enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=128, dtype="float32")
    which = [None, 0, 1, 0]
    loras = [None if w is None else LoRARequest(f"a{w}", w + 1, adapters[w]) for w in which]
    outs = llm.generate(PROMPTS, GREEDY, lora_request=loras, use_tqdm=False)
    for prompt, w, out in zip(PROMPTS, which, outs):
        ref_model = hf if w is None else peft_model(hf, adapters[w])
        assert out.outputs[0].token_ids == greedy(ref_model, tok, prompt, GREEDY.max_tokens), (prompt, w)
