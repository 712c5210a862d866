"""The model's ``generation_config.json``: default sampling parameters and extra EOS ids, as vLLM's
``--generation-config``:

- ``"auto"`` (the default): read from the model's folder;
- ``"vllm"``: no sampling defaults (SamplingParams' own); EOS ids are still read from the model's folder;
- a folder path: read from that folder (which must hold a generation_config.json).

Sampling defaults apply only to what a request leaves unset (``LLM.generate`` with no params,
``LLM.get_default_sampling_params()``, the server's absent request fields).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from vllm.logger import init_logger

logger = init_logger(__name__)

# generation_config.json keys -> SamplingParams fields (vLLM's set)
_SAMPLING_KEYS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature", "top_k": "top_k",
                  "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class GenerationDefaults:
    """``sampling``: SamplingParams field -> default; ``eos_token_ids``: the generation config's EOS ids
    (None when there is no generation_config.json: then config.json's apply)."""

    sampling: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: Optional[list[int]] = None
    source: Optional[str] = None  # the folder read, for messages


def _read(folder: str) -> Optional[dict[str, Any]]:
    """The keys set in ``folder``/generation_config.json, or None when there is none."""
    if not os.path.isfile(os.path.join(folder, "generation_config.json")):
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder, local_files_only=True).to_diff_dict()
    except Exception as e:  # transformers raises several types for a malformed file
        raise ValueError(f"{folder}/generation_config.json could not be read: {e}; fix it, or pass "
                         "generation_config='vllm' (--generation-config vllm) to ignore its sampling defaults") from e


def load_generation_defaults(model_path: str, mode: str = "auto") -> GenerationDefaults:
    """Read the defaults for ``mode`` ("auto", "vllm" or a folder); bad values raise ValueError here,
    at start-up, naming the file."""
    from vllm.sampling_params import SamplingParams

    if mode not in ("auto", "vllm") and not os.path.isfile(os.path.join(os.fspath(mode), "generation_config.json")):
        raise FileNotFoundError(f"generation_config {mode!r}: expected 'auto', 'vllm' or a folder holding "
                                "generation_config.json")
    folder = model_path if mode in ("auto", "vllm") else os.fspath(mode)
    found = _read(folder)
    if found is None:
        return GenerationDefaults()
    eos = found.get("eos_token_id")
    eos_ids = None if eos is None else [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    sampling = {}
    if mode != "vllm":
        sampling = {ours: found[key] for key, ours in _SAMPLING_KEYS.items() if found.get(key) is not None}
        try:
            SamplingParams(**sampling)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{folder}/generation_config.json gives default sampling parameters that are not "
                             f"valid ({e}); fix them, or pass generation_config='vllm' (--generation-config "
                             "vllm) to ignore them") from e
    return GenerationDefaults(sampling, eos_ids, folder)
