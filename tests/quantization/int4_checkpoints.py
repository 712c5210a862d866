"""Int4 checkpoints written for the tests, independently of the engine's decoders.

The packers follow FACTS.md section 10 (the formats as their libraries write them): they build
each int32 word from its eight codes, the inverse of what ``int4_packing`` does, and never call
the engine's code.  ``reference_dequantize`` is the formats' formula
``w[o, i] = scale[o, g(i)] * (q[o, i] - zero[o, g(i)])`` evaluated in float32 (exact for fp16 /
bf16 scales and 4-bit codes), rounded once to the scales' dtype, as the libraries' dequantisers do.

``write_int4_checkpoint`` turns a float checkpoint folder into a GPTQ, AWQ or compressed-tensors
one (chosen modules quantized, the rest kept) plus the float checkpoint of its dequantised weights.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass
class RawInt4:
    """One quantized weight as the tests make it: codes [out, in] 0..15, scales/zeros [out, G]."""

    q: torch.Tensor  # int64 codes 0..15
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]  # int64 0..15, None: symmetric (8); GPTQ v1 stores 0 as 15 = zero 16
    group_size: int
    g_idx: Optional[torch.Tensor] = None  # int64 [in], None: i // group_size

    def groups_of_inputs(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx
        return torch.arange(self.q.shape[1]) // self.group_size


def random_int4(out: int, inp: int, group_size: int, *, asym: bool, act_order: bool = False,
                scale_dtype: torch.dtype = torch.float16, seed: int = 0) -> RawInt4:
    g = torch.Generator().manual_seed(seed)
    groups = inp // group_size
    q = torch.randint(0, 16, (out, inp), generator=g)
    scales = (torch.rand(out, groups, generator=g) * 0.02 + 0.005).to(scale_dtype)
    zeros = torch.randint(0, 16, (out, groups), generator=g) if asym else None
    g_idx = torch.randperm(inp, generator=g) // group_size if act_order else None
    return RawInt4(q, scales, zeros, group_size, g_idx)


def quantize(w: torch.Tensor, group_size: int, *, asym: bool, act_order: bool = False,
             scale_dtype: torch.dtype = torch.float16, seed: int = 0) -> RawInt4:
    """Round-to-nearest int4 of a float weight [out, in] (act-order: a random channel-to-group permutation)."""
    out, inp = w.shape
    g_idx = torch.randperm(inp, generator=torch.Generator().manual_seed(seed)) // group_size if act_order else None
    groups = g_idx if g_idx is not None else torch.arange(inp) // group_size
    G = inp // group_size
    scales = torch.empty(out, G)
    zeros = torch.empty(out, G, dtype=torch.long) if asym else None
    for grp in range(G):
        cols = w[:, groups == grp].float()
        if asym:
            lo, hi = cols.amin(dim=1).clamp(max=0), cols.amax(dim=1).clamp(min=0)
            scales[:, grp] = ((hi - lo) / 15).clamp(min=1e-5)
            zeros[:, grp] = (-lo / scales[:, grp]).round().clamp(0, 15).long()
        else:
            scales[:, grp] = (cols.abs().amax(dim=1) / 7).clamp(min=1e-5)
    scales = scales.to(scale_dtype)
    zero_cols = (zeros if asym else torch.full((out, G), 8))[:, groups]
    q = (w.float() / scales.float()[:, groups]).round() + zero_cols
    return RawInt4(q.clamp(0, 15).long(), scales, zeros, group_size, g_idx)


def reference_dequantize(raw: RawInt4, fmt: str = "", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """In ``dtype`` (default: the scales'), rounded once from float32.  ``fmt`` "gptq": v1 stores
    zero - 1 in 4 bits, so a zero of 0 comes back as 16 (as GPTQ's readers do)."""
    grp = raw.groups_of_inputs()
    zeros = raw.zeros
    if fmt == "gptq" and zeros is not None:
        zeros = torch.where(zeros == 0, 16, zeros)
    z = (zeros if zeros is not None else torch.full_like(raw.q[:, :1].expand(-1, raw.scales.shape[1]), 8))
    w = (raw.q - z[:, grp]).float() * raw.scales.float()[:, grp]
    return w.to(dtype or raw.scales.dtype)


# ---- packing (FACTS.md 10), word by word -------------------------------------------------
def _words(codes: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """codes [..., 8n] -> int32 [..., n]: code k of word j is column 8j + order[k]."""
    c = codes.long().reshape(*codes.shape[:-1], -1, 8)
    word = torch.zeros(c.shape[:-1], dtype=torch.long)
    for k in range(8):
        word |= (c[..., order[k]] & 0xF) << (4 * k)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def pack_gptq(raw: RawInt4) -> dict[str, torch.Tensor]:
    """GPTQ v1: qweight [in/8, out] along the input; qzeros [G, out/8] hold zero - 1 (so 0 is stored as 15)."""
    zeros = raw.zeros if raw.zeros is not None else torch.full_like(raw.scales, 8, dtype=torch.long)
    return {"qweight": _words(raw.q).t().contiguous(),  # word [o, r] holds q[o, 8r + k]; stored [in/8, out]
            "qzeros": _words((zeros - 1).t()),  # [G, out] -> [G, out/8]; -1 & 0xF = 15
            "scales": raw.scales.t().contiguous(),
            "g_idx": raw.groups_of_inputs().to(torch.int32)}


def pack_awq(raw: RawInt4) -> dict[str, torch.Tensor]:
    """AWQ gemm: qweight [in, out/8], qzeros [G, out/8], AWQ's nibble order, no zero offset."""
    assert raw.zeros is not None and raw.g_idx is None
    return {"qweight": _words(raw.q.t(), AWQ_ORDER), "qzeros": _words(raw.zeros.t(), AWQ_ORDER),
            "scales": raw.scales.t().contiguous()}


def pack_compressed_tensors(raw: RawInt4) -> dict[str, torch.Tensor]:
    """pack-quantized: weight_packed [out, in/8] (codes q + 8 = our codes), zero points packed along out."""
    out, inp = raw.q.shape
    pad = (-inp) % 8
    tensors = {"weight_packed": _words(torch.nn.functional.pad(raw.q, (0, pad))),
               "weight_scale": raw.scales.contiguous(), "weight_shape": torch.tensor([out, inp])}
    if raw.zeros is not None:
        zp = torch.nn.functional.pad(raw.zeros.t(), (0, (-out) % 8))  # [G, out]
        tensors["weight_zero_point"] = _words(zp).t().contiguous()  # [ceil(out/8), G]
    if raw.g_idx is not None:
        tensors["weight_g_idx"] = raw.g_idx.to(torch.int32)
    return tensors


PACKERS: dict[str, Callable[[RawInt4], dict[str, torch.Tensor]]] = {
    "gptq": pack_gptq, "awq": pack_awq, "compressed-tensors": pack_compressed_tensors}


def quantization_config(fmt: str, group_size: int, *, asym: bool, act_order: bool,
                        skip: tuple[str, ...] = ()) -> dict:
    """``skip``: regexes (re.match on module names) of modules kept in float."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": not asym,
                "checkpoint_format": "gptq", "dynamic": {f"-:{s}": {} for s in skip}}
    if fmt == "awq":
        # AWQ matches substrings: the tests' skip patterns are ".*<escaped substring>.*"
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": [s.replace(".*", "").replace("\\", "") for s in skip]}
    weights = {"num_bits": 4, "type": "int", "symmetric": not asym, "strategy": "group", "group_size": group_size,
               "actorder": "group" if act_order else None, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head"] + [f"re:{s}" for s in skip]}


def write_int4_checkpoint(float_dir: str, out_dir: str, deq_dir: str, fmt: str, *, group_size: int, asym: bool,
                          act_order: bool = False, quantized: str = r".*(_proj|\.w[123])$",
                          skip: tuple[str, ...] = ()) -> list[str]:
    """Quantize the modules whose name re.match-es ``quantized`` and none of ``skip``; write the int4
    checkpoint to ``out_dir`` and its dequantised float checkpoint to ``deq_dir``.  Returns the
    quantized module names."""
    state = load_file(os.path.join(float_dir, "model.safetensors"))
    packed, deq, names = {}, {}, []
    for key, w in sorted(state.items()):
        module = key[:-len(".weight")] if key.endswith(".weight") else None
        if module is None or w.dim() != 2 or not re.match(quantized, module) \
                or any(re.match(s, module) for s in skip):
            packed[key] = deq[key] = w
            continue
        # act-order comes from the input's statistics, so projections reading the same input (gate and
        # up, Mixtral's w1 and w3) share one order, as in real GPTQ checkpoints
        shared_input = re.sub(r"(gate_proj|up_proj)$", "gate_up", re.sub(r"\.w[13]$", ".w13", module))
        raw = quantize(w, group_size, asym=asym, act_order=act_order,
                       scale_dtype=w.dtype if fmt == "compressed-tensors" else torch.float16,
                       seed=zlib.crc32(shared_input.encode()) & 0xFFFF)
        for suffix, t in PACKERS[fmt](raw).items():
            packed[f"{module}.{suffix}"] = t
        deq[key] = reference_dequantize(raw, fmt, w.dtype)
        names.append(module)
    for folder, tensors in ((out_dir, packed), (deq_dir, deq)):
        shutil.copytree(float_dir, folder, dirs_exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config(fmt, group_size, asym=asym, act_order=act_order, skip=skip)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return names
