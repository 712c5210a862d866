"""LoRAModelManager on the real models: wrapping, whole-model parity with peft, slots, LRU caches, removal.

Checkpoints are tiny random transformers models (``tests.models.hf_checkpoints``);
our models load them with ``get_model``.  The parity test runs a batch with one
prompt on a real peft adapter (attention, experts, dense and shared-expert MLPs)
and one prompt without, through the paged runner, and compares the logits with
the peft model's forward (adapter on / off).
"""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.models.hf_checkpoints import PagedRunner, make_checkpoint, single_thread  # noqa: F401
from tests.utils import assert_close
from vllm.config.lora import LoRAConfig
from vllm.config.model import ModelConfig
from vllm.lora.layers.fused_moe import FusedMoEWithLoRA
from vllm.lora.layers.linear import MergedColumnParallelLinearWithLoRA, QKVParallelLinearWithLoRA
from vllm.lora.model_manager import LoRAModelManager
from vllm.lora.peft_loader import LoRALoadError
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.lora.request import LoRARequest
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.model_loader import get_model

H = 64  # hidden size of every checkpoint in tests.models.hf_checkpoints
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(arch: str):
        if arch not in made:
            folder = tmp_path_factory.mktemp(arch)
            made[arch] = (folder, make_checkpoint(arch, folder))
        return made[arch]

    return get


def manager(folder, *, max_loras=2, max_cpu_loras=None, rank=8, kind="cpu", device="cpu"):
    cfg = ModelConfig(str(folder))
    model = get_model(cfg, device=device, lora_enabled=True)
    punica = get_punica_wrapper(64, max_loras, device, kind=kind)
    lora_cfg = LoRAConfig(max_loras=max_loras, max_lora_rank=rank, max_cpu_loras=max_cpu_loras)
    return LoRAModelManager(model, lora_cfg, punica), model, cfg


def dense_adapter(folder, modules: dict, *, r=4, seed=0) -> dict:
    """Write an adapter for ``modules`` {name: (in, out)}; return {name: (A, B * scale)}."""
    gen = torch.Generator().manual_seed(seed)
    tensors, out = {}, {}
    for name, (n_in, n_out) in modules.items():
        a, b = torch.randn(r, n_in, generator=gen) / n_in**0.5, torch.randn(n_out, r, generator=gen)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        out[name] = (a, b * 2.0)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2.0 * r, "target_modules": sorted(modules)},
              open(os.path.join(folder, "adapter_config.json"), "w"))
    return out


def add_q_adapters(mgr, tmp_path, ids):
    weights = {}
    for i in ids:
        weights[i] = dense_adapter(tmp_path / f"a{i}", {Q0: (H, H)}, seed=i)[Q0]
        assert mgr.add_adapter(LoRARequest(f"a{i}", i, str(tmp_path / f"a{i}")))
    return weights


def slot_a(mgr, slot):
    return mgr.modules["model.layers.0.self_attn.qkv_proj"].lora_a_stacked[0][slot, :4]


# ---- tests -------------------------------------------------------------------------------------
def test_request_semantics():
    a, b = LoRARequest("x", 1, "/p"), LoRARequest(lora_name="y", lora_int_id=1, lora_path="/q")
    assert a == b and hash(a) == hash(b) and len({a, b, LoRARequest("z", 2, "/p")}) == 2
    assert a.adapter_id == 1 and LoRARequest("x", 3, "", "/old").lora_path == "/old"
    for bad in (0, -2):
        with pytest.raises(ValueError, match=">= 1"):
            LoRARequest("x", bad, "/p")
    with pytest.raises(TypeError):
        LoRARequest("x", True, "/p")
    with pytest.raises(ValueError, match="lora_path"):
        LoRARequest("x", 1, "")


def test_wraps_supported_layers_with_hf_names(checkpoints):
    mgr, model, _ = manager(checkpoints("qwen2_moe")[0])
    p = "model.layers.1"
    assert {n[len(p) + 1:] for n in mgr.modules if n.startswith(p + ".")} == {
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate", "mlp.experts", "mlp.shared_expert.gate_up_proj",
        "mlp.shared_expert.down_proj", "mlp.shared_expert_gate"}
    assert isinstance(mgr.modules[f"{p}.self_attn.qkv_proj"], QKVParallelLinearWithLoRA)
    assert isinstance(mgr.modules[f"{p}.mlp.experts"], FusedMoEWithLoRA)
    assert isinstance(model.model.layers[1].mlp.shared_expert.gate_up_proj, MergedColumnParallelLinearWithLoRA)
    for sub in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.qkv_proj", "mlp.shared_expert.up_proj"):
        assert f"{p}.{sub}" in mgr.module_table
    assert mgr.module_table[f"{p}.self_attn.k_proj"].out_features == 32
    with pytest.raises(ValueError, match="already LoRA-wrapped"):
        LoRAModelManager(model, LoRAConfig(max_loras=2), mgr.punica_wrapper)
    mixtral = manager(checkpoints("mixtral")[0])[0]
    assert "model.layers.0.block_sparse_moe.experts" in mixtral.module_table
    assert "model.layers.0.mlp.gate_proj" in manager(checkpoints("qwen3_moe")[0])[0].module_table  # dense layer 0


def test_shared_expert_inside_fused_moe_keeps_its_own_name():
    """A shared expert also held by FusedMoE (``shared_experts=``) is named and wrapped under mlp.shared_expert."""
    shared = nn.Module()
    shared.gate_up_proj, shared.down_proj = MergedColumnParallelLinear(16, [8, 8]), RowParallelLinear(8, 16)
    mlp = nn.Module()
    mlp.experts = FusedMoE(4, 2, 16, 8, params_dtype=torch.float32, moe_backend="torch", lora_enabled=True,
                           shared_experts=shared)
    mlp.experts.process_weights_after_loading()  # a layer built by hand is finalised before LoRA wrapping
    mlp.shared_expert = shared
    model = nn.Module()
    model.mlp = mlp
    model.packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    mgr = LoRAModelManager(model, LoRAConfig(max_loras=1), get_punica_wrapper(8, 1, "cpu", kind="cpu"))
    assert set(mgr.modules) == {"mlp.experts", "mlp.shared_expert.gate_up_proj", "mlp.shared_expert.down_proj"}
    assert mlp.experts.base_layer.shared_experts.gate_up_proj is mgr.modules["mlp.shared_expert.gate_up_proj"]


def _peft_adapter(hf, folder):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(hf, LoraConfig(
            r=8, lora_alpha=8, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                            "shared_expert_gate"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        for n, p in peft_model.named_parameters():  # peft's random B is large: keep the logits in a sane range
            if "lora_B" in n:
                p.data.mul_(0.1)
        peft_model.save_pretrained(str(folder))
    return peft_model


@pytest.mark.parametrize("arch,kind", [("qwen3_moe", "cpu"), ("qwen2_moe", "cpu"), ("mixtral", "cpu"),
                                       ("qwen2_moe", "gpu")])
def test_whole_model_logits_match_peft(checkpoints, tmp_path, arch, kind, device):
    """Prompt 0 on the adapter, prompt 1 on the base model, in one batch."""
    device = device if kind == "gpu" else torch.device("cpu")  # the Triton wrapper on the GPU when present
    folder, hf = checkpoints(arch)
    peft_model = _peft_adapter(hf, tmp_path / "adapter")
    try:
        # peft 0.21 maps target_modules gate_proj/up_proj onto the fused experts too: gate_up gets rank 2r
        mgr, model, cfg = manager(folder, kind=kind, device=device, rank=16)
        assert mgr.add_adapter(LoRARequest("a", 7, str(tmp_path / "adapter")))
        prompts = [[3, 17, 101, 5, 64, 9], [9, 2, 77, 120, 33, 33, 8]]
        mgr.set_adapter_mapping([7] * len(prompts[0]) + [0] * len(prompts[1]))
        runner = PagedRunner(model, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                             num_layers=cfg.num_layers, num_seqs=2)
        got = runner.prefill(prompts)
        with torch.no_grad():
            want_lora = peft_model(torch.tensor([prompts[0]])).logits[0]
            with peft_model.disable_adapter():
                want_base = peft_model(torch.tensor([prompts[1]])).logits[0]
                base_0 = peft_model(torch.tensor([prompts[0]])).logits[0]
        assert (want_lora - base_0).abs().max() > 0.02 * base_0.abs().max()  # the adapter matters (10x the bound)
        assert_close(got[0], want_lora, torch.float32, name=f"{arch} logits with the adapter")
        assert_close(got[1], want_base, torch.float32, name=f"{arch} logits without adapter")
    finally:
        peft_model.unload()  # give the module-scoped checkpoint model back without LoRA layers


def test_packed_slices_missing_slices_and_packed_name(checkpoints, tmp_path):
    mgr, model, _ = manager(checkpoints("qwen2_moe")[0])
    sh = "model.layers.0.mlp.shared_expert"
    w = dense_adapter(tmp_path / "a", {Q0: (H, H), f"{sh}.up_proj": (H, 48)})
    mgr.add_adapter(LoRARequest("a", 1, str(tmp_path / "a")))
    qkv = "model.layers.1.self_attn.qkv_proj"
    w2 = dense_adapter(tmp_path / "b", {qkv: (H, 128)}, seed=3)[qkv]  # the packed module targeted as a whole
    mgr.add_adapter(LoRARequest("b", 2, str(tmp_path / "b")))
    mgr.set_adapter_mapping([1, 2, 0])
    gate_up = mgr.modules[f"{sh}.gate_up_proj"]
    assert torch.equal(gate_up.lora_a_stacked[0][0], torch.zeros(8, H))  # gate_proj not targeted
    assert torch.equal(gate_up.lora_a_stacked[1][0, :4], w[f"{sh}.up_proj"][0])
    x = torch.randn(3, H)
    layer0 = model.model.layers[0].self_attn.qkv_proj
    y, y0 = layer0(x), layer0.base_layer(x)
    assert torch.equal(y[:, H:], y0[:, H:]) and torch.equal(y[1:], y0[1:])  # k, v zero; other tokens base
    a, b = w[Q0]
    assert_close(y[0, :H], y0[0, :H] + b @ (a @ x[0]), torch.float32)
    layer1 = model.model.layers[1].self_attn.qkv_proj
    a, b = w2
    want = layer1.base_layer(x)
    want[1] += b @ (a @ x[1])
    assert_close(layer1(x), want, torch.float32)


def test_slot_assignment_and_slot_lru(checkpoints, tmp_path):
    mgr, _, _ = manager(checkpoints("qwen2_moe")[0], max_loras=2, max_cpu_loras=3)
    w = add_q_adapters(mgr, tmp_path, [1, 2, 3])
    assert mgr.set_adapter_mapping([1, 2, 0, 1]) == [0, 1, -1, 0]
    assert mgr.set_adapter_mapping([3, 2]) == [0, 1]  # 1 was least recently used and is not in this batch
    assert mgr.get_slot(1) is None and mgr.active_adapters == {2: 1, 3: 0}
    assert torch.equal(slot_a(mgr, 0), w[3][0])
    assert mgr.set_adapter_mapping([1]) == [1]  # order of the last batch: 2 then 3, so 2 leaves
    assert mgr.active_adapters == {3: 0, 1: 1} and torch.equal(slot_a(mgr, 1), w[1][0])
    with pytest.raises(RuntimeError, match="max_loras is 2"):
        mgr.set_adapter_mapping([1, 2, 3])
    with pytest.raises(KeyError, match="not loaded"):
        mgr.set_adapter_mapping([9])


def test_cpu_cache_lru_never_evicts_the_current_batch(checkpoints, tmp_path):
    mgr, _, _ = manager(checkpoints("qwen2_moe")[0], max_loras=2, max_cpu_loras=3)
    add_q_adapters(mgr, tmp_path, [1, 2, 3])
    mgr.set_adapter_mapping([1, 2])
    add_q_adapters(mgr, tmp_path, [4])  # 3 is the least recently used one outside the batch
    assert list(mgr.list_adapters()) == [1, 2, 4]
    mgr.set_adapter_mapping([4])  # 4 takes slot 0 from 1
    add_q_adapters(mgr, tmp_path, [5])  # 1 and 2 are candidates; 1 holds no slot any more
    assert list(mgr.list_adapters()) == [2, 4, 5] and mgr.active_adapters == {2: 1, 4: 0}
    assert not mgr.add_adapter(LoRARequest("a5", 5, str(tmp_path / "a5")))
    dense_adapter(tmp_path / "bad", {"model.layers.0.self_attn.nope": (H, H)})
    with pytest.raises(LoRALoadError, match="does not have"):
        mgr.add_adapter(LoRARequest("bad", 6, str(tmp_path / "bad")))
    assert list(mgr.list_adapters()) == [2, 4, 5]  # a failed load evicts nothing


def test_remove_clears_the_slot_exactly(checkpoints, tmp_path):
    folder, hf = checkpoints("qwen2_moe")
    peft_model = _peft_adapter(hf, tmp_path / "a")
    peft_model.unload()
    mgr, model, _ = manager(folder, rank=16)
    mgr.add_adapter(LoRARequest("a", 1, str(tmp_path / "a")))
    mgr.set_adapter_mapping([1, 1, 1])
    assert mgr.remove_adapter(1) and not mgr.remove_adapter(1)
    assert mgr.list_adapters() == {} and mgr.active_adapters == {}
    mgr.punica_wrapper.update_metadata([0, 0, 0])  # tokens still pointing at the cleared slot
    for name, wrapper in mgr.modules.items():
        assert int(wrapper.adapter_enabled[0]) == 0, name
        base = wrapper.base_layer
        if isinstance(wrapper, FusedMoEWithLoRA):
            args = (torch.randn(3, H), torch.randn(3, base.global_num_experts))
        else:
            args = (torch.randn(3, base.input_size_per_partition),)
        assert torch.equal(wrapper(*args), base(*args)), name


def test_mapping_is_built_once_per_step(checkpoints, tmp_path, monkeypatch):
    mgr, model, _ = manager(checkpoints("qwen2_moe")[0])
    add_q_adapters(mgr, tmp_path, [1])
    calls = []
    original = mgr.punica_wrapper.update_metadata
    monkeypatch.setattr(mgr.punica_wrapper, "update_metadata", lambda m: (calls.append(list(m)), original(m)))
    mgr.set_adapter_mapping([1, 0, 1])
    for wrapper in mgr.modules.values():
        assert wrapper.punica_wrapper is mgr.punica_wrapper
        base = wrapper.base_layer
        if isinstance(wrapper, FusedMoEWithLoRA):
            wrapper(torch.randn(3, H), torch.randn(3, base.global_num_experts))
        else:
            wrapper(torch.randn(3, base.input_size_per_partition))
    assert calls == [[0, -1, 0]]
    ctx = mgr.modules["model.layers.0.mlp.experts"].base_layer.lora_context
    assert ctx.punica_wrapper is mgr.punica_wrapper


def test_layers_without_an_active_adapter_launch_nothing(checkpoints, tmp_path):
    """Per step, a layer runs its LoRA ops only if some token uses a slot holding its weights:
    a base-only step launches none (logits bit-identical to the model without LoRA), an adapter
    on one projection launches only that layer's, an adapter on the experts launches theirs."""
    from collections import Counter

    folder, hf = checkpoints("qwen3_moe")  # layer 0 dense, layer 1 sparse
    mgr, model, cfg = manager(folder, rank=16)
    calls, pw = Counter(), mgr.punica_wrapper
    for op in ("add_lora_linear", "add_lora_w13", "add_lora_w2"):  # count launches (a spy on this instance)
        def spy(*args, _op=op, _real=getattr(pw, op), **kwargs):
            calls[_op] += 1
            return _real(*args, **kwargs)
        setattr(pw, op, spy)
    dense_adapter(tmp_path / "q", {Q0: (H, H)})
    mgr.add_adapter(LoRARequest("q", 1, str(tmp_path / "q")))
    peft_model = _peft_adapter(hf, tmp_path / "all")
    peft_model.unload()
    mgr.add_adapter(LoRARequest("all", 2, str(tmp_path / "all")))
    prompt = [3, 17, 101, 5, 64]

    def run(lora_id):
        calls.clear()
        mgr.set_adapter_mapping([lora_id] * len(prompt))
        runner = PagedRunner(model, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                             num_layers=cfg.num_layers, num_seqs=1)
        return runner.prefill([prompt])[0], dict(calls)

    plain = get_model(cfg, device="cpu")
    want = PagedRunner(plain, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                       num_seqs=1).prefill([prompt])[0]
    got, launched = run(0)
    assert launched == {} and torch.equal(got, want)
    got, launched = run(1)
    assert launched == {"add_lora_linear": 1} and not torch.equal(got, want)  # layer 0's qkv_proj only
    _, launched = run(2)
    assert launched["add_lora_w13"] == launched["add_lora_w2"] == 1  # the one sparse layer
    # qkv + o in both layers; peft saved nothing for layer 0's dense MLP, the routers have none: no launch
    assert launched["add_lora_linear"] == 4
