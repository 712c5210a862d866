"""Model resolution from the local Hugging Face hub cache (offline) and generation_config.json defaults."""
import json
import os
import shutil

from huggingface_hub import constants as hf_constants
import pytest

from vllm import LLM, SamplingParams

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
KW = dict(max_model_len=64, block_size=4, num_gpu_blocks_override=64)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["hello=", "abc="]


def _tokens(llm, params=GREEDY, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding Org/Demo: snapshot A (main) = the demo model; snapshot B (branch "short") =
    the demo model with max_position_embeddings 32."""
    cache = tmp_path / "hub"
    repo = cache / "models--Org--Demo"
    shutil.copytree(DEMO, repo / "snapshots" / COMMIT_A)
    shutil.copytree(DEMO, repo / "snapshots" / COMMIT_B)
    cfg_b = repo / "snapshots" / COMMIT_B / "config.json"
    cfg = json.loads(cfg_b.read_text())
    cfg["max_position_embeddings"] = 32
    cfg_b.write_text(json.dumps(cfg))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    (repo / "refs" / "short").write_text(COMMIT_B)
    # huggingface_hub reads HF_HUB_CACHE when imported: set both (a fresh process reads the variable)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return repo


def test_hub_id_generates_as_the_folder(hub_cache):
    by_id = LLM("Org/Demo", **KW)
    assert by_id.llm_engine.model_config.model == str(hub_cache / "snapshots" / COMMIT_A)
    assert _tokens(by_id) == _tokens(LLM(DEMO, **KW))


@pytest.mark.parametrize("revision,commit,max_len", [(None, COMMIT_A, 64), ("main", COMMIT_A, 64),
                                                      ("short", COMMIT_B, 32), (COMMIT_B, COMMIT_B, 32)])
def test_revision_picks_the_snapshot(hub_cache, revision, commit, max_len):
    from vllm.config.model import ModelConfig

    cfg = ModelConfig("Org/Demo", revision=revision)
    assert cfg.model == str(hub_cache / "snapshots" / commit)
    assert cfg.max_model_len == max_len


def test_tokenizer_hub_id_and_revision(hub_cache):
    llm = LLM(DEMO, tokenizer="Org/Demo", tokenizer_revision="short", **KW)
    assert llm.get_tokenizer().name_or_path == str(hub_cache / "snapshots" / COMMIT_B)


@pytest.mark.parametrize("name,revision", [("Org/Missing", None), ("Org/Demo", "nope")])
def test_not_cached_says_how_to_download(hub_cache, name, revision):
    with pytest.raises(FileNotFoundError) as e:
        LLM(name, revision=revision, **KW)
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and str(hub_cache.parent) in msg
    assert f"hf download {name}" in msg and "HF_HUB_CACHE" in msg
    if revision:
        assert f"--revision {revision}" in msg


def test_not_a_folder_nor_an_id():
    with pytest.raises(FileNotFoundError, match="no such folder .*config.json.* not a Hugging Face hub id"):
        LLM("/no/such/folder", **KW)


# ---- generation_config.json --------------------------------------------------------------------
def _model_with_generation_config(tmp_path, **values):
    path = tmp_path / "model"
    shutil.copytree(DEMO, path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(values)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return str(path)


def test_generation_config_defaults(tmp_path):
    path = _model_with_generation_config(tmp_path, temperature=0.5, top_p=0.9, top_k=1, min_p=0.05,
                                         repetition_penalty=1.0, max_new_tokens=5)
    llm = LLM(path, **KW)
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k, d.min_p, d.repetition_penalty, d.max_tokens) == (0.5, 0.9, 1, 0.05,
                                                                                              1.0, 5)
    # top_k=1 is greedy: params=None uses the defaults (5 tokens, greedy) ...
    want = _tokens(llm, SamplingParams(temperature=0, max_tokens=5))
    assert all(len(t) <= 5 for t in want)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, use_tqdm=False)] == want
    # ... explicit params are used as given
    assert all(len(t) == 8 for t in _tokens(llm))


def test_generation_config_vllm_ignores_the_sampling_defaults(tmp_path):
    path = _model_with_generation_config(tmp_path, temperature=0.5, top_k=1, max_new_tokens=5)
    d = LLM(path, generation_config="vllm", **KW).get_default_sampling_params()
    assert d == SamplingParams()


def test_generation_config_from_another_folder(tmp_path):
    other = tmp_path / "gen"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "top_p": 0.5}))
    d = LLM(DEMO, generation_config=str(other), **KW).get_default_sampling_params()
    assert (d.max_tokens, d.top_p) == (3, 0.5)
    with pytest.raises(FileNotFoundError, match="'auto', 'vllm' or a folder"):
        LLM(DEMO, generation_config=str(tmp_path / "none"), **KW)


def test_generation_config_bad_value_is_refused_at_start(tmp_path):
    path = _model_with_generation_config(tmp_path, top_p=7.0)
    with pytest.raises(ValueError, match="generation_config.json gives default sampling parameters"):
        LLM(path, **KW)


@pytest.mark.parametrize("mode", ["auto", "vllm"])
def test_generation_config_eos_ids_stop(tmp_path, mode):
    """An EOS id listed only in generation_config.json stops generation (in both modes, as vLLM)."""
    first = _tokens(LLM(DEMO, **KW), SamplingParams(temperature=0, max_tokens=1), ["hello="])[0][0]
    path = _model_with_generation_config(tmp_path, eos_token_id=[2, first])
    llm = LLM(path, generation_config=mode, **KW)
    out = llm.generate(["hello="], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"
    ignored = llm.generate(["hello="], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert len(ignored.token_ids) == 8


def test_chat_template_override():
    llm = LLM(DEMO, **KW)
    template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}="
    out = llm.chat([{"role": "user", "content": "hello"}], GREEDY, chat_template=template, use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("HELLO=", add_special_tokens=False)
    assert out.outputs[0].token_ids == _tokens(llm, GREEDY, [{"prompt_token_ids": out.prompt_token_ids}])[0]


def test_chat_template_from_a_file_and_bad_ones(tmp_path):
    llm = LLM(DEMO, **KW)
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[-1]['content'] | upper }}=")
    out = llm.chat([{"role": "user", "content": "abc"}], GREEDY, chat_template=str(path), use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("ABC=", add_special_tokens=False)
    with pytest.raises(ValueError, match="not a file and does not look like a Jinja template"):
        llm.chat([{"role": "user", "content": "abc"}], GREEDY, chat_template=str(tmp_path / "none.jinja"))
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        llm.chat([{"role": "user", "content": "abc"}], GREEDY, chat_template="{% for m in messages %}")
