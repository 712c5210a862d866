"""The tuned tile files shipped in the wheel (vllm/kernel_configs/tuned, written by benchmarks/kernels/tune_moe.py
on a GPU) are well-formed: the name follows ``config_file_name``, every entry builds its op's typed config with
every key present, tile sizes are powers of two, and the two GEMMs of one layer (and the two MoE LoRA ops) agree
on BLOCK_SIZE_M at every token count, since they share one alignment."""
from __future__ import annotations

import json
import os
import re

import pytest

from vllm.kernel_configs import _SHIPPED, config_file_name
from vllm.kernel_configs.tile_config import Int4TileConfig, Mxfp4TileConfig, MoELoRATileConfig, TileConfig

_CLASSES = {"fused_moe_gemm": TileConfig, "int4_moe_gemm": Int4TileConfig, "mxfp4_moe_gemm": Mxfp4TileConfig,
            "fused_moe_lora_w13": MoELoRATileConfig, "fused_moe_lora_w2": MoELoRATileConfig}
_POW2_FIELDS = ("block_size_m", "block_size_n", "block_size_k")


def _parse(name: str) -> tuple[str, dict[str, int], str]:
    parts = name[:-len(".json")].split(",")
    op, device = parts[0], None
    key = {}
    for part in parts[1:]:
        k, v = part.split("=", 1)
        if k == "device_name":
            device = v
        else:
            key[k] = int(v)
    assert device, f"{name}: no device_name"
    assert config_file_name(op, key, device.replace("_", " ")) == name, f"{name}: not the name the lookup builds"
    return op, key, device


def _shipped() -> list[str]:
    return sorted(f for f in os.listdir(_SHIPPED) if f.endswith(".json"))


def _load(name: str) -> dict[int, dict]:
    with open(os.path.join(_SHIPPED, name)) as f:
        return {int(m): cfg for m, cfg in json.load(f).items()}


def test_some_files_are_shipped():
    assert any(f.startswith("fused_moe_gemm,") for f in _shipped())
    assert any(f.startswith("fused_moe_lora_w13,") for f in _shipped())


@pytest.mark.parametrize("name", _shipped())
def test_entries_build_their_typed_config(name):
    op, key, _ = _parse(name)
    assert op in _CLASSES, f"{name}: unknown op {op!r}"
    cls = _CLASSES[op]
    table = _load(name)
    assert table, f"{name}: empty"
    for tokens, entry in table.items():
        assert tokens >= 1
        cfg = cls.from_json(entry, source=f"{name} entry {tokens}")  # no base: every required key present
        for field in _POW2_FIELDS:
            v = getattr(cfg, field, None)
            if v is not None:
                assert v & (v - 1) == 0, f"{name} entry {tokens}: {field}={v} is not a power of two"


def _block_m(name: str) -> dict[int, int]:
    return {m: e["BLOCK_SIZE_M"] for m, e in _load(name).items()}


def test_the_two_gemms_of_a_layer_share_block_size_m():
    """w13 [E, N=2I, K=H] and w2 [E, N=H, K=I] read one expert alignment: the same BLOCK_SIZE_M per entry."""
    pairs = 0
    for name in _shipped():
        op, key, device = _parse(name)
        if op != "fused_moe_gemm" or key["N"] % 2:
            continue
        w2 = config_file_name(op, {"E": key["E"], "N": key["K"], "K": key["N"] // 2}, device.replace("_", " "))
        if not os.path.exists(os.path.join(_SHIPPED, w2)) or w2 == name:
            continue
        pairs += 1
        a, b = _block_m(name), _block_m(w2)
        # the second GEMM looks its tiles up by (token, expert) pairs, the first by tokens: top_k apart
        top_k = min(b) // min(a)
        assert sorted(m * top_k for m in a) == sorted(b), f"{name} / {w2}: token counts {sorted(a)} vs {sorted(b)}"
        for m in a:
            assert a[m] == b[m * top_k], f"{name} / {w2} at {m} tokens: BLOCK_SIZE_M {a[m]} vs {b[m * top_k]}"
    assert pairs >= 1


def test_the_two_moe_lora_ops_share_block_size_m():
    """Each w13 LoRA file has its w2 twin with the same BLOCK_SIZE_M per entry: w13 as two slices (N = I, w2 at the
    same rank) or, for peft's adapters on fused experts (``tune_moe.py --w13-layout fused``), one slice of N = 2I
    at twice w2's rank."""
    pairs = 0
    for name in _shipped():
        op, key, device = _parse(name)
        if op != "fused_moe_lora_w13":
            continue
        twins = [config_file_name("fused_moe_lora_w2", {"E": key["E"], "N": key["K"], "K": k, "R": r},
                                  device.replace("_", " "))
                 for k, r in ((key["N"], key["R"]), (key["N"] // 2, key["R"] // 2))]
        found = [w for w in twins if os.path.exists(os.path.join(_SHIPPED, w))]
        assert found, f"{name} has no w2 twin ({' or '.join(twins)})"
        w2 = found[0]
        pairs += 1
        a, b = _block_m(name), _block_m(w2)
        assert set(a) == set(b), f"{name} / {w2}: token counts differ"
        for m in a:
            assert a[m] == b[m], f"{name} / {w2} at {m}: BLOCK_SIZE_M {a[m]} vs {b[m]}"
    assert pairs >= 1
