"""The committed demo model and adapters (examples/demo_model, examples/demo_adapters).

Loads them with transformers + peft (the reference, not our engine) and checks
that on held-out strings the base model copies, ``upper`` upper-cases and
``rot13`` rot13s (exact match, at most one miss in 20), and that the char
tokenizer and its chat template behave as documented in
examples/train_demo_model.py.
"""
import codecs
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.path.join(ROOT, "examples", "demo_model")
ADAPTER_DIR = os.path.join(ROOT, "examples", "demo_adapters")

# The first 20 of the script's held-out strings (seed 12345), none of which was trained on.
HELDOUT = ["xazjlgisn", "ldnir", "trflx", "qxns", "egxcg", "kaokaqwx", "aavfysfjd", "dvsfxmhqt",
           "zbhdpgxz", "isnqe", "fja", "hlrkf", "kabbwocmz", "zaywl", "vqydpt", "aup", "ytnrglyv",
           "recp", "khgff", "ercqwae"]

TASKS = {
    "base": lambda s: s,
    "upper": str.upper,
    "rot13": lambda s: codecs.encode(s, "rot13"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def _base():
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return model.eval()


def _generate(model, tok, strings):
    out = {}
    lengths = sorted({len(s) for s in strings})
    with torch.no_grad():
        for n in lengths:
            group = [s for s in strings if len(s) == n]
            ids = torch.tensor([tok.encode(s + "=") for s in group])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            for s, row in zip(group, gen[:, ids.shape[1]:].tolist()):
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id)]
                out[s] = tok.decode(row, skip_special_tokens=True)
    return [out[s] for s in strings]


def test_tokenizer_round_trip(tokenizer):
    tok = tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 57
    for s in ["hello=", "abcXYZ=", "xazjlgisn="]:
        ids = tok.encode(s)
        assert len(ids) == len(s)  # one id per character, no BOS/EOS added
        assert tok.decode(ids) == s
        assert tok.decode([tok.bos_token_id] + ids + [tok.eos_token_id, tok.pad_token_id],
                          skip_special_tokens=True) == s
    assert tok.encode("=") == [4]
    assert tok.encode("a") == [5] and tok.encode("z") == [30] and tok.encode("A") == [31]
    assert tok.encode("a?") == [5, tok.unk_token_id]
    text = tok.apply_chat_template([{"role": "system", "content": "ignored"},
                                    {"role": "user", "content": "hello"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "hello="


def test_saved_layout():
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert cfg["tie_word_embeddings"] is False and cfg["norm_topk_prob"] is True
    for name, rank in (("upper", 4), ("rot13", 8)):
        with open(os.path.join(ADAPTER_DIR, name, "adapter_config.json")) as f:
            acfg = json.load(f)
        assert acfg["r"] == rank
        assert not os.path.isabs(acfg["base_model_name_or_path"])
        assert set(acfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert set(acfg["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}


@pytest.mark.parametrize("name", list(TASKS))
def test_exact_match(name, tokenizer):
    model = _base()
    if name != "base":
        model = peft.PeftModel.from_pretrained(model, os.path.join(ADAPTER_DIR, name)).eval()
    got = _generate(model, tokenizer, HELDOUT)
    want = [TASKS[name](s) for s in HELDOUT]
    misses = [(s, g) for s, g, w in zip(HELDOUT, got, want) if g != w]
    assert len(misses) <= 1, misses
    if name != "base":
        # The adapter visibly changes what the model answers.
        assert sum(g == s for g, s in zip(got, HELDOUT)) <= 1
