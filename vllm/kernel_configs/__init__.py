"""Tuned kernel configurations (tile sizes, warps, stages) read from JSON files.

A file holds the best configs of one op for one problem shape on one GPU, found
by a tuning run.  Its name is the op name followed by the shape key and the GPU:

    {op},{key1}={value1},{key2}={value2},...,device_name={gpu}.json

with the keys sorted by name and spaces in the GPU name replaced by '_', e.g.
``fused_moe_lora_w13,E=128,K=2048,N=768,R=16,device_name=NVIDIA_H100_80GB_HBM3.json``.
The content maps a token count (as a string) to a config dict; the entry whose
token count is nearest to the batch is used:

    {"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, ...}, "64": {...}, ...}

up to ``REACH`` times the file's largest token count: past it the caller's heuristic
(a file tuned at decode sizes only must not give a prefill its small tiles - on an
H100 a file tuned up to 256 tokens made the 16384-token prefill steps' MoE GEMMs
2.6x slower than with entries up to 4096).

Kernels with a typed tile config (``tile_config.py``: ``TileConfig``, the 4-bit GEMMs'
``Int4TileConfig`` / ``Mxfp4TileConfig``, the MoE LoRA ``MoELoRATileConfig``) read an entry through ``tile_config.tuned_tiles``: an entry may
hold some keys only (the heuristic gives the rest); an unknown key is an error naming
the file.

Files are searched in ``VLLM_TUNED_CONFIG_FOLDER`` (when set), then in the
folder shipped with the package (``vllm/kernel_configs/tuned``).  No match
means the caller falls back to its heuristic.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping, Optional

from vllm import envs
from vllm.logger import init_logger

logger = init_logger(__name__)

_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
# an entry stands for token counts up to this factor above the file's largest
REACH = 8


def config_file_name(op: str, key: Mapping[str, Any], device_name: str) -> str:
    parts = [op] + [f"{k}={key[k]}" for k in sorted(key)] + [f"device_name={device_name.replace(' ', '_')}"]
    return ",".join(parts) + ".json"


@functools.lru_cache(maxsize=256)
def _load(path: str) -> Optional[dict[int, dict[str, Any]]]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        table = {int(m): dict(cfg) for m, cfg in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("ignoring tuned config %s: %s", path, exc)
        return None
    if not table:
        return None
    logger.info("using tuned kernel configs from %s", path)
    return table


def find_tuned_config(op: str, key: Mapping[str, Any], num_tokens: int,
                      device_name: str) -> Optional[tuple[dict[str, Any], str, int]]:
    """(entry, file path, its token count) of the tuned entry for ``op`` nearest ``num_tokens``, or None.

    Typed tile configs read it through ``vllm.kernel_configs.tile_config.tuned_tiles``."""
    name = config_file_name(op, key, device_name)
    folders = [f for f in (envs.VLLM_TUNED_CONFIG_FOLDER, _SHIPPED) if f]
    for folder in folders:
        path = os.path.join(folder, name)
        table = _load(path)
        if table:
            largest = max(table)
            if num_tokens > REACH * largest:
                _beyond_reach(path, largest, num_tokens)
                return None
            best = min(table, key=lambda m: (abs(m - num_tokens), m))
            return dict(table[best]), path, best
    return None


@functools.lru_cache(maxsize=256)
def _beyond_reach(path: str, largest: int, num_tokens: int) -> None:
    logger.info("tuned config %s: %d tokens is over %dx its largest entry (%d): using the heuristic; tune "
                "larger token counts (benchmarks/kernels/tune_moe.py --tokens) to cover it",
                path, num_tokens, REACH, largest)


def lookup_tuned_config(op: str, key: Mapping[str, Any], num_tokens: int, device_name: str) -> Optional[dict[str, Any]]:
    """The tuned config for ``op`` at the token count nearest ``num_tokens``, or None."""
    found = find_tuned_config(op, key, num_tokens, device_name)
    return None if found is None else found[0]


def clear_cache() -> None:
    _load.cache_clear()
    _beyond_reach.cache_clear()
