"""Typed tile configs and their JSON form (the entries of tuned files)."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest

from vllm.kernel_configs import REACH, clear_cache, config_file_name
from vllm.kernel_configs.tile_config import (FusedLinearLoRABatchTileConfig, FusedLinearLoRATileConfig, Int4TileConfig,
                                             LoRALinearTileConfig, MoELoRATileConfig, Mxfp4TileConfig, TileConfig,
                                             tuned_tiles)

ALL = [TileConfig, Int4TileConfig, Mxfp4TileConfig, MoELoRATileConfig, LoRALinearTileConfig, FusedLinearLoRATileConfig,
       FusedLinearLoRABatchTileConfig]


@pytest.mark.parametrize("cls", ALL)
def test_json_round_trip(cls):
    rng = random.Random(0)
    for _ in range(20):
        values = {f.name: rng.choice([False, True] if f.name in cls.FLAGS else [1, 2, 4, 16, 64, 256])
                  for f in dataclasses.fields(cls)}
        cfg = cls(**values)
        js = cfg.to_json()
        assert list(js) == list(cls.JSON_KEYS)  # every key, in the documented order
        assert json.loads(json.dumps(js)) == js
        assert cls.from_json(js) == cfg
        # JSON keys and fields are paired one to one: each key carries its own field's value
        assert {cls.JSON_KEYS[k]: v for k, v in js.items()} == values


def test_known_json_names():
    cfg = TileConfig(block_size_m=16, block_size_n=32, block_size_k=64, group_size_m=8, split_k=2, num_warps=8,
                     num_stages=4)
    assert cfg.to_json() == {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
                             "SPLIT_K": 2, "num_warps": 8, "num_stages": 4, "GEMV": 0}
    lora = MoELoRATileConfig(block_size_m=16, block_size_n=32, block_size_k=64, num_n_splits=3)
    assert lora.to_json() == {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "NUM_N_SPLITS": 3,
                              "num_warps": 4, "num_stages": 3, "SHRINK_SPLIT_K": 1}


def test_partial_entry_fills_from_base_or_defaults():
    base = TileConfig(64, 128, 32, group_size_m=8, num_warps=8)
    assert TileConfig.from_json({"BLOCK_SIZE_N": 256}, base=base) == dataclasses.replace(base, block_size_n=256)
    assert TileConfig.from_json({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32}) == TileConfig(
        16, 32, 32, group_size_m=1, split_k=1, num_warps=4, num_stages=3)


@pytest.mark.parametrize("entry,match", [
    ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "NUM_N_SPLITS": 2}, r"unknown key\(s\)"),
    ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32}, "block_size_k"),  # a required field missing, no base
    ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32.0}, "must be an integer"),
    ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": True}, "must be an integer"),
    ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": -32}, "positive"),
    ([["BLOCK_SIZE_M", 16]], "JSON object"),
])
def test_bad_entries_name_their_source(entry, match):
    with pytest.raises(ValueError, match=match) as info:
        TileConfig.from_json(entry, source="my_file.json")
    assert str(info.value).startswith("my_file.json: ")


def test_4bit_configs_extend_the_gemm_tiles():
    int4 = Int4TileConfig(16, 32, 128, split_k=2, unpack=3)
    assert int4.to_json() == {**TileConfig(16, 32, 128, split_k=2).to_json(), "UNPACK": 3, "GEMV": 0}
    mx = Mxfp4TileConfig.from_json({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "DECODE_ASM": 0})
    assert mx == Mxfp4TileConfig(16, 64, 128, decode_asm=0) and Mxfp4TileConfig(16, 64, 128).decode_asm == 1
    assert Int4TileConfig(16, 32, 128) != TileConfig(16, 32, 128)  # a distinct type, not just more fields
    # the mode switches may be 0, nothing below
    with pytest.raises(ValueError, match="unpack must be a non-negative int"):
        Int4TileConfig(16, 32, 32, unpack=-1)
    with pytest.raises(ValueError, match="num_stages must be a positive int"):
        Mxfp4TileConfig(16, 32, 32, num_stages=0, decode_asm=0)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['UNPACK'\]"):  # each kernel its own keys
        Mxfp4TileConfig.from_json({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "UNPACK": 0})
    # the bf16 GEMM refuses a 4-bit GEMM's config (its extra field would be ignored there)
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import check_tile_config

    with pytest.raises(TypeError, match="Int4TileConfig"):
        check_tile_config(Int4TileConfig(16, 32, 32))


def test_flags_are_bools():
    cfg = LoRALinearTileConfig.from_json({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "token_path": True})
    assert cfg.token_path is True and cfg.to_json()["token_path"] is True
    with pytest.raises(ValueError, match="token_path=1 must be true or false"):
        LoRALinearTileConfig.from_json({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "token_path": 1}, source="f")
    with pytest.raises(ValueError, match="shrink_in_loop must be a bool"):
        FusedLinearLoRATileConfig(16, 64, shrink_in_loop=1)
    assert FusedLinearLoRABatchTileConfig(32, 16, 64, loop_slots=0).loop_slots == 0  # 0: every shrink after the loop


def test_frozen_and_checked_on_construction():
    cfg = TileConfig(16, 32, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size_m = 32
    with pytest.raises(ValueError, match="num_warps"):
        TileConfig(16, 32, 32, num_warps=0)
    with pytest.raises(ValueError, match="block_size_n"):
        MoELoRATileConfig(16, "32", 32)


def test_tuned_tiles_reads_the_nearest_entry(tmp_path, monkeypatch):
    key = {"E": 4, "N": 8, "K": 16}
    name = config_file_name("some_op", key, "Some GPU")
    (tmp_path / name).write_text(json.dumps({"1": {"BLOCK_SIZE_N": 32}, "64": {"BLOCK_SIZE_N": 128, "num_warps": 8},
                                             "512": {"BLOCK_SIZE_N": 64, "split_k": 2}}))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    base = TileConfig(16, 16, 16)
    clear_cache()
    try:
        assert tuned_tiles(base, "other_op", key, 64, "Some GPU") is base  # no file: the base itself
        assert tuned_tiles(base, "some_op", key, 3, "Some GPU") == TileConfig(16, 32, 16)
        assert tuned_tiles(base, "some_op", key, 100, "Some GPU") == TileConfig(16, 128, 16, num_warps=8)
        with pytest.raises(ValueError, match=r"unknown key\(s\) \['split_k'\]") as info:  # the field name is no key
            tuned_tiles(base, "some_op", key, 1000, "Some GPU")
        assert name in str(info.value) and "entry 512" in str(info.value)
        # up to REACH x the largest entry (512) it stands for larger batches; past it the base (heuristic)
        with pytest.raises(ValueError, match="entry 512"):
            tuned_tiles(base, "some_op", key, REACH * 512, "Some GPU")
        assert tuned_tiles(base, "some_op", key, REACH * 512 + 1, "Some GPU") is base

        def no_wide_tiles(cfg: TileConfig) -> None:
            if cfg.block_size_n > 64:
                raise ValueError("too wide")

        with pytest.raises(ValueError, match=f"{name}.*entry 64.*too wide"):
            tuned_tiles(base, "some_op", key, 64, "Some GPU", check=no_wide_tiles)
    finally:
        clear_cache()
