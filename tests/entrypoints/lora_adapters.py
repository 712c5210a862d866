"""Random non-zero PEFT adapters for the tiny models, saved as peft saves them, and
the transformers + peft reference (greedy tokens, logits)."""
from __future__ import annotations

import copy
import json
import os
import warnings

import torch
from safetensors.torch import load_file, save_file

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_peft_adapter(hf_base, folder, *, rank: int, seed: int, alpha: int = 16, dense_mlp: bool = True):
    """An adapter on attention, the fused experts and (if present) dense / shared-expert MLPs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = ATTN + (["gate_proj", "up_proj", "down_proj"] if dense_mlp else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(hf_base), LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, target_parameters=EXPERTS, init_lora_weights=False))
        with torch.no_grad():  # peft's random init is small for B; make the adapter clearly visible
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3 / rank**0.5)
        peft_model.save_pretrained(str(folder))
    return str(folder)


def to_per_expert_layout(src: str, dst: str, num_experts: int, hidden: int, inter: int,
                         block: str = "mlp", names=("gate_proj", "up_proj", "down_proj"),
                         interleaved: bool = False) -> str:
    """Rewrite a fused-experts adapter with the older per-expert keys (FACTS.md 3); same deltas.
    ``interleaved`` (gpt-oss): gate_up's rows alternate gate, up (else gate rows first)."""
    fused = load_file(os.path.join(src, "adapter_model.safetensors"))
    config = json.load(open(os.path.join(src, "adapter_config.json")))
    E, H, I = num_experts, hidden, inter
    out = {k: v for k, v in fused.items() if ".experts." not in k}
    layers = sorted({k.split(".layers.")[1].split(".")[0] for k in fused if ".experts." in k}, key=int)
    for i in layers:
        p = f"base_model.model.model.layers.{i}.mlp.experts"
        # ranks from the shapes: peft's rank_pattern may give gate_up another rank than r
        r13 = fused[f"{p}.base_layer.lora_A.weight"].shape[0] // E
        r2 = fused[f"{p}.lora_A.weight"].shape[0] // E
        a13 = fused[f"{p}.base_layer.lora_A.weight"].reshape(E, r13, H)
        b13 = fused[f"{p}.base_layer.lora_B.weight"].reshape(2 * I, r13, E)
        a2 = fused[f"{p}.lora_A.weight"].reshape(E, r2, I)
        b2 = fused[f"{p}.lora_B.weight"].reshape(H, r2, E)
        q = f"base_model.model.model.layers.{i}.{block}.experts"
        for e in range(E):
            gate, up = (b13[0::2], b13[1::2]) if interleaved else (b13[:I], b13[I:])
            for n, a, b in ((names[0], a13[e], gate[:, :, e]), (names[1], a13[e], up[:, :, e]),
                            (names[2], a2[e], b2[:, :, e])):
                out[f"{q}.{e}.{n}.lora_A.weight"] = a.contiguous().clone()
                out[f"{q}.{e}.{n}.lora_B.weight"] = b.contiguous().clone()
    os.makedirs(dst, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in out.items()}, os.path.join(dst, "adapter_model.safetensors"))
    # gate/up keep gate_up's rank and alpha (peft's rank_pattern / alpha_pattern for it)
    gu_r = config.get("rank_pattern", {}).get(r".*\.gate_up_proj", config["r"])
    gu_alpha = config.get("alpha_pattern", {}).get(r".*\.gate_up_proj", config["lora_alpha"])
    config["rank_pattern"] = {rf".*\.{names[0]}": gu_r, rf".*\.{names[1]}": gu_r}
    config["alpha_pattern"] = {rf".*\.{names[0]}": gu_alpha, rf".*\.{names[1]}": gu_alpha}
    config = dict(config, target_parameters=None,
                  target_modules=sorted(set(config["target_modules"]) | set(names)))
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return dst


def peft_model(hf_base, adapter: str):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(hf_base), adapter).eval()


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok.encode(prompt)
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()
