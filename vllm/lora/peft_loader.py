"""Load a PEFT LoRA adapter folder into a ``LoRAModel``, validated against the model.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (what
``PeftModel.save_pretrained`` writes).  Keys lose their ``base_model.model.``
prefix and are read as (FACTS.md 3):

    <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r]
        a dense module -> LoRALayerWeights(lora_a, lora_b * scale)
    <experts>.base_layer.lora_A|B.weight and <experts>.lora_A|B.weight
        peft 0.21 fused experts (``target_parameters``): A [r*E, in] expert-major,
        B [out, r*E] rank-major.  Which one is gate_up and which is down is read
        from the shapes (gate_up: in = H, out = w13 rows; down: in = I, out = H);
        only when both fit, from ``target_parameters``, then from peft's nesting
        (gate_up is the inner ``base_layer`` wrapper).
    <experts>.{e}.gate_proj|up_proj|down_proj.lora_A|B.weight (Mixtral: w1|w3|w2)
        older per-expert adapters -> two w13 slices (gate, up).

Both expert layouts become one ``MoELoRAModuleSpec`` module's ``MoELoRALayerWeights``.
Names are matched against the model's module table, after the model's own
``map_hf_module_name`` when it has one; ``mlp.`` and ``block_sparse_moe.`` are
interchangeable anyway (transformers 5 renamed Mixtral's MoE block).

scale = lora_alpha / r (lora_alpha / sqrt(r) with ``use_rslora``), with r and
alpha taken per module from ``rank_pattern`` / ``alpha_pattern`` when a key
matches (a pattern matches a module name equal to it or ending in "." + it; for
fused experts the name is ``<experts>.gate_up_proj`` / ``<experts>.down_proj``).

Weights must be float16, bfloat16, float32 or float64, and finite.  Every problem raises
``LoRALoadError`` saying what is wrong and what to do.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Mapping, Optional

import torch

from vllm.lora.lora_weights import (LayerWeights, LoRALayerWeights, LoRAModel, LoRAModuleSpec, MoELoRALayerWeights,
                                    MoELoRAModuleSpec, ModuleSpec)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+?)(?P<inner>\.base_layer)?\.lora_(?P<ab>[AB])\.weight$")
_PER_EXPERT = re.compile(r"^(?P<moe>.+)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)$")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_ALIASES = ((".mlp.", ".block_sparse_moe."), (".block_sparse_moe.", ".mlp."))
# Dtypes a LoRA weight may have on disk (anything else - ints, bools, fp8 - is refused, not cast).
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LoRALoadError(ValueError):
    """An adapter cannot be loaded; the message says what is wrong and what to do."""


class PEFTConfig:
    """The parts of ``adapter_config.json`` that decide how weights are read."""

    def __init__(self, raw: dict, where: str) -> None:
        self.where = where
        if raw.get("peft_type", "LORA") != "LORA":
            raise LoRALoadError(f"{where}: peft_type is {raw.get('peft_type')!r}; only LoRA adapters (LORA) are served")
        unsupported = (("use_dora", "DoRA"), ("lora_bias", "LoRA bias vectors"), ("fan_in_fan_out", "fan_in_fan_out"))
        for key, what in unsupported:
            if raw.get(key):
                raise LoRALoadError(f"{where}: {key}=true ({what}) is not supported; retrain or convert the adapter "
                                    "to plain LoRA")
        if raw.get("bias", "none") not in ("none", None):
            raise LoRALoadError(f"{where}: bias={raw['bias']!r} trains base-model biases, which are not served; "
                                "use an adapter trained with bias='none'")
        if raw.get("modules_to_save"):
            raise LoRALoadError(f"{where}: modules_to_save={raw['modules_to_save']} replaces whole modules, which "
                                "is not supported; serve an adapter without modules_to_save")
        if not isinstance(raw.get("r"), int) or raw["r"] < 1 or not isinstance(raw.get("lora_alpha"), (int, float)):
            raise LoRALoadError(f"{where}: needs an integer 'r' >= 1 and a number 'lora_alpha' "
                                f"(got r={raw.get('r')!r}, lora_alpha={raw.get('lora_alpha')!r})")
        self.r = int(raw["r"])
        self.lora_alpha = float(raw["lora_alpha"])
        self.use_rslora = bool(raw.get("use_rslora", False))
        self.rank_pattern = dict(raw.get("rank_pattern") or {})
        self.alpha_pattern = dict(raw.get("alpha_pattern") or {})
        self.target_parameters = list(raw.get("target_parameters") or [])

    @staticmethod
    def _lookup(patterns: dict, key: str, default):
        for pattern, value in patterns.items():
            if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", key):
                return value
        return default

    def rank_and_scale(self, key: str) -> tuple[int, float]:
        """(r, scaling) of the module (or fused parameter) named ``key`` in the adapter's naming."""
        r = int(self._lookup(self.rank_pattern, key, self.r))
        alpha = float(self._lookup(self.alpha_pattern, key, self.lora_alpha))
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)

    def targets(self, param: str) -> bool:
        return any(t == param or t.endswith("." + param) for t in self.target_parameters)


def _read_folder(lora_path: str) -> tuple[PEFTConfig, dict[str, torch.Tensor]]:
    path = os.path.abspath(os.path.expanduser(lora_path))
    if not os.path.isdir(path):
        raise LoRALoadError(f"LoRA adapter folder {lora_path!r} does not exist (or is not a folder). Give the local "
                            f"folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}; hub names are not downloaded.")
    cfg_file, w_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(cfg_file):
        raise LoRALoadError(f"{path} has no {CONFIG_NAME}; save the adapter with PeftModel.save_pretrained")
    if not os.path.isfile(w_file):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise LoRALoadError(f"{path} has only adapter_model.bin: pickled weights are not loaded (unsafe). Convert "
                                "it: load it with peft and call save_pretrained(..., safe_serialization=True)")
        raise LoRALoadError(f"{path} has no {WEIGHTS_NAME}; save the adapter with PeftModel.save_pretrained")
    try:
        with open(cfg_file) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise LoRALoadError(f"{cfg_file} is not valid JSON ({e}); re-save the adapter") from e
    config = PEFTConfig(raw, path)
    try:
        from safetensors.torch import load_file

        tensors = load_file(w_file, device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise LoRALoadError(f"{w_file} is not a readable safetensors file ({type(e).__name__}: {e}); the file is "
                            "corrupt or truncated: copy or re-save the adapter") from e
    for key, t in tensors.items():
        if t.dtype not in _WEIGHT_DTYPES:
            raise LoRALoadError(f"{w_file}: tensor {key} has dtype {str(t.dtype).removeprefix('torch.')}; LoRA "
                                "weights must be float16, bfloat16, float32 or float64. The file is not a LoRA "
                                "adapter, or was quantized or converted wrongly: re-save it from peft")
        if not torch.isfinite(t).all():
            raise LoRALoadError(f"{w_file}: tensor {key} contains NaN or Inf; the adapter is broken (diverged "
                                "training or a bad conversion): use another checkpoint")
    return config, tensors


def _resolve(name: str, table: Mapping[str, ModuleSpec],
             name_mapper: Optional[Callable[[str], str]] = None) -> Optional[str]:
    if name in table:
        return name
    if name_mapper is not None and name_mapper(name) in table:
        return name_mapper(name)
    for a, b in _ALIASES:
        alt = name.replace(a, b)
        if alt != name and alt in table:
            return alt
    return None


class _Loader:
    def __init__(self, config: PEFTConfig, table: Mapping[str, ModuleSpec], max_lora_rank: int,
                 dtype: Optional[torch.dtype], name_mapper: Optional[Callable[[str], str]]) -> None:
        self.cfg, self.table, self.max_rank, self.name_mapper = config, table, max_lora_rank, name_mapper
        self.dtype = dtype or torch.float32
        self.where = config.where

    def error(self, msg: str) -> LoRALoadError:
        return LoRALoadError(f"{self.where}: {msg}")

    def check_rank(self, what: str, rank: int) -> None:
        if rank > self.max_rank:
            raise self.error(f"{what} has rank {rank} > max_lora_rank={self.max_rank}; restart the engine with "
                             f"--max-lora-rank {rank} or more (or serve a lower-rank adapter)")

    def rank_of(self, key: str, found: int) -> tuple[int, float]:
        r, scale = self.cfg.rank_and_scale(key)
        if found != r:
            raise self.error(f"{key}: weights have rank {found} but adapter_config.json gives r={r} "
                             "(rank_pattern); the config does not belong to these weights")
        return r, scale

    # ---- grouping keys -------------------------------------------------------------------
    def group(self, tensors: dict[str, torch.Tensor]):
        dense: dict[str, dict] = {}
        fused: dict[str, dict] = {}
        per_expert: dict[str, dict] = {}
        unknown, unsupported = [], []
        for key, t in tensors.items():
            k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _KEY.match(k)
            if m is None:
                unsupported.append(key)
                continue
            module, ab = m["module"], m["ab"]
            target = _resolve(module, self.table, self.name_mapper)
            if m["inner"] or isinstance(self.table.get(target), MoELoRAModuleSpec):
                if target is None or not isinstance(self.table[target], MoELoRAModuleSpec):
                    unknown.append(module)
                    continue
                slot = fused.setdefault(target, {"adapter_name": module}).setdefault(
                    "inner" if m["inner"] else "outer", {})
                slot[ab] = t
                continue
            pe = _PER_EXPERT.match(module)
            moe_target = _resolve(pe["moe"], self.table, self.name_mapper) if pe else None
            if pe and isinstance(self.table.get(moe_target), MoELoRAModuleSpec):
                d = per_expert.setdefault(moe_target, {})
                d.setdefault((int(pe["expert"]), _ROLE[pe["proj"]], module), {})[ab] = t
                continue
            if target is None or not isinstance(self.table[target], LoRAModuleSpec):
                unknown.append(module)
                continue
            dense.setdefault(target, {"adapter_name": module})[ab] = t
        if unsupported:
            raise self.error(f"unsupported tensors {sorted(unsupported)[:4]} (only lora_A / lora_B weights of plain "
                             "LoRA are served: no DoRA magnitudes, embedding LoRA, biases or modules_to_save)")
        if unknown:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in self.table})
            raise self.error(f"the adapter targets modules this model does not have or cannot adapt: "
                             f"{sorted(set(unknown))[:4]}; this model takes LoRA on modules named {suffixes}. Use an "
                             "adapter trained for this model")
        return dense, fused, per_expert

    @staticmethod
    def pair(d: dict, what: str, where: str):
        if "A" not in d or "B" not in d:
            raise LoRALoadError(f"{where}: {what} has lora_{'B' if 'A' in d else 'A'} but not its partner; "
                                "the adapter file is incomplete")
        return d["A"].float(), d["B"].float()

    # ---- dense -----------------------------------------------------------------------------
    def dense(self, target: str, d: dict) -> LoRALayerWeights:
        name = d["adapter_name"]
        a, b = self.pair(d, name, self.where)
        spec: LoRAModuleSpec = self.table[target]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise self.error(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] and "
                             "[out, r] with the same r; the adapter file is malformed")
        if a.shape[1] != spec.in_features or b.shape[0] != spec.out_features:
            raise self.error(f"{name}: LoRA is for a {a.shape[1]} -> {b.shape[0]} layer but this model's {target} "
                             f"is {spec.in_features} -> {spec.out_features}; the adapter was trained for another "
                             "model")
        r, scale = self.rank_of(name, a.shape[0])
        self.check_rank(name, r)
        return LoRALayerWeights(target, r, a.to(self.dtype), (b * scale).to(self.dtype))

    # ---- fused experts (peft 0.21, target_parameters) ----------------------------------------
    def _role(self, which: str, a: torch.Tensor, b: torch.Tensor, spec: MoELoRAModuleSpec, both: bool) -> str:
        fits = []
        if a.shape[1] == spec.hidden_size and b.shape[0] == spec.w13_rows:
            fits.append("gate_up")
        if a.shape[1] == spec.intermediate_size and b.shape[0] == spec.hidden_size:
            fits.append("down")
        if len(fits) == 1:
            return fits[0]
        if not fits:
            raise self.error(f"fused experts LoRA with lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} fits neither "
                             f"gate_up (in {spec.hidden_size}, out {spec.w13_rows}) nor down (in "
                             f"{spec.intermediate_size}, out {spec.hidden_size}); the adapter is for another model")
        listed = [p for p in ("gate_up_proj", "down_proj") if self.cfg.targets(p)]
        if len(listed) == 1:
            return listed[0].removesuffix("_proj")
        return "gate_up" if (which == "inner" or not both) else "down"

    def fused(self, target: str, d: dict) -> MoELoRALayerWeights:
        spec: MoELoRAModuleSpec = self.table[target]
        name, E = d["adapter_name"], spec.num_experts
        parts = {}
        for which in ("inner", "outer"):
            if which not in d:
                continue
            a, b = self.pair(d[which], f"{name}{'.base_layer' if which == 'inner' else ''}", self.where)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise self.error(f"{name}: fused experts lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} are not "
                                 "[r*E, in] / [out, r*E]; the adapter file is malformed")
            role = self._role(which, a, b, spec, both=len(d) == 3)
            if role in parts:
                raise self.error(f"{name}: two fused experts LoRAs both look like {role}; the adapter is malformed")
            r, scale = self.cfg.rank_and_scale(f"{name}.{role}_proj")
            if a.shape[0] != r * E:
                raise self.error(f"{name} ({role}): lora_A has {a.shape[0]} rows, expected r*E = {r}*{E} for this "
                                 f"model's E={E} experts; the adapter was trained for another model")
            a_e = a.reshape(E, r, a.shape[1])
            b_e = b.reshape(b.shape[0], r, E).permute(2, 0, 1) * scale  # [E, out, r]
            parts[role] = (a_e, b_e)
        return self._moe(target, spec, w13=[parts["gate_up"]] if "gate_up" in parts else None, w2=parts.get("down"))

    # ---- per-expert (older) layout -------------------------------------------------------------
    def per_expert(self, target: str, d: dict) -> MoELoRALayerWeights:
        spec: MoELoRAModuleSpec = self.table[target]
        E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
        want = {"gate": (H, I), "up": (H, I), "down": (I, H)}
        by_role: dict[str, dict[int, tuple]] = {}
        for (e, role, name), pair in d.items():
            if not spec.gated and role == "gate":
                raise self.error(f"{name}: this model's experts are not gated (no gate projection)")
            if e >= E:
                raise self.error(f"{name}: expert {e} does not exist, this model has {E} experts per layer")
            a, b = self.pair(pair, name, self.where)
            n_in, n_out = want[role]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[1] != n_in or b.shape[0] != n_out:
                raise self.error(f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} must be [r, {n_in}] / "
                                 f"[{n_out}, r] for this model; the adapter was trained for another model")
            r, scale = self.rank_of(name, a.shape[0])
            by_role.setdefault(role, {})[e] = (a, b * scale)

        def stack(role: str, r: int):
            n_in, n_out = want[role]
            a, b = torch.zeros(E, r, n_in), torch.zeros(E, n_out, r)
            for e, (ae, be) in by_role.get(role, {}).items():
                a[e, : ae.shape[0]], b[e, :, : be.shape[1]] = ae, be
            return a, b

        def rank(*roles: str) -> int:
            return max([p[0].shape[0] for ro in roles for p in by_role.get(ro, {}).values()], default=0)

        w13_roles = ("gate", "up") if spec.gated else ("up",)
        r13 = rank(*w13_roles)
        w13 = [stack(ro, r13) for ro in w13_roles] if r13 else None
        r2 = rank("down")
        return self._moe(target, spec, w13=w13, w2=stack("down", r2) if r2 else None)

    def _moe(self, target: str, spec: MoELoRAModuleSpec, w13: Optional[list], w2: Optional[tuple]
             ) -> MoELoRALayerWeights:
        E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
        r13 = w13[0][0].shape[1] if w13 else 0
        r2 = w2[0].shape[1] if w2 else 0
        if w13 is None:  # the adapter did not target gate_up: zeros of the other part's rank
            w13 = [(torch.zeros(E, r2, H), torch.zeros(E, spec.w13_rows, r2))]
        if w2 is None:
            w2 = (torch.zeros(E, r13, I), torch.zeros(E, H, r13))
        eff13 = r13 * (2 if (len(w13) == 2 and spec.w13_slices == 1) else 1)  # two slices into one: rank 2r
        self.check_rank(f"{target} (experts)", max(eff13, r2))
        cast = lambda t: t.to(self.dtype).contiguous()  # noqa: E731
        return MoELoRALayerWeights(target, max(r13, r2), [cast(a) for a, _ in w13], [cast(b) for _, b in w13],
                                   cast(w2[0]), cast(w2[1]))


def load_peft_adapter(lora_path: str, module_table: Mapping[str, ModuleSpec], *, max_lora_rank: int,
                      lora_int_id: int = 0, name: str = "", dtype: Optional[torch.dtype] = None,
                      name_mapper: Optional[Callable[[str], str]] = None) -> LoRAModel:
    """Read, convert and validate the adapter in ``lora_path`` (see the module docstring).

    module_table: model module name (HF naming, q_proj not qkv_proj) -> its spec;
        ``LoRAModelManager.module_table`` gives it for a wrapped model.
    dtype: dtype of the returned tensors (default fp32; scaling is folded in fp32 first).
    name_mapper: the model's own HF-name -> module-name mapping (``map_hf_module_name``), tried
        before the built-in ``mlp.`` <-> ``block_sparse_moe.`` alias.
    """
    config, tensors = _read_folder(lora_path)
    loader = _Loader(config, module_table, max_lora_rank, dtype, name_mapper)
    dense, fused, per_expert = loader.group(tensors)
    if not (dense or fused or per_expert):
        raise loader.error(f"{WEIGHTS_NAME} holds no LoRA weights")
    loras: dict[str, LayerWeights] = {}
    for target, d in dense.items():
        loras[target] = loader.dense(target, d)
    for target, d in fused.items():
        if target in per_expert:
            raise loader.error(f"{target}: both fused and per-expert LoRA weights; the adapter is malformed")
        loras[target] = loader.fused(target, d)
    for target, d in per_expert.items():
        loras[target] = loader.per_expert(target, d)
    rank = max(w.rank for w in loras.values())
    return LoRAModel(lora_int_id=lora_int_id, rank=rank, loras=loras, name=name, path=lora_path)
