"""ModelConfig: which checkpoint, in which dtype, for how long a context.

    cfg = ModelConfig("/path/to/model" or "Org/Name", dtype="auto", max_model_len=None, revision=None)
    cfg.model            the local folder (a hub id is resolved from the local hub cache, at ``revision``)
    cfg.hf_config        the transformers config read from <model>/config.json
    cfg.dtype            torch.dtype, resolved (see below)
    cfg.max_model_len    int, resolved (default: max_position_embeddings)

dtype: "auto" takes the checkpoint's ``dtype`` (``torch_dtype`` in older
configs); a float32 checkpoint stays float32.  A config without one gets
bfloat16 on a GPU and float32 on CPU.  Explicit: "bfloat16", "float16" ("half"),
"float32" ("float"), or a torch.dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype, config_dtype: Any, *, on_gpu: bool) -> torch.dtype:
    """The torch dtype for a requested ``dtype`` and the checkpoint's own (str, torch.dtype or None)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of bfloat16, float16, float32")
        return dtype
    name = str(dtype).strip().lower()
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if config_dtype is None:
        return torch.bfloat16 if on_gpu else torch.float32
    if isinstance(config_dtype, torch.dtype):
        resolved = config_dtype
    else:
        resolved = _DTYPES.get(str(config_dtype).replace("torch.", "").lower())
    if resolved not in _DTYPES.values():
        raise ValueError(f"the checkpoint's dtype {config_dtype!r} is not supported; pass dtype= explicitly")
    return resolved


@dataclass
class ModelConfig:
    """``model`` is a local folder with config.json, or a hub id cached locally (resolved to its snapshot
    folder at ``revision``); ``seed`` seeds sampling; the rest is resolved once."""

    model: str
    dtype: str | torch.dtype = "auto"
    max_model_len: Optional[int] = None
    seed: int = 0
    trust_remote_code: bool = False
    revision: Optional[str] = None
    quantization: Optional[str] = None
    hf_config: Any = field(init=False, repr=False)
    quant_config: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from vllm.transformers_utils.hub import resolve_model_path

        path = self.model = resolve_model_path(self.model, self.revision)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no config.json in {path!r}: `model` must be a checkpoint folder (or a hub "
                                    "id in the local Hugging Face cache) with config.json, weights and tokenizer")
        from transformers import AutoConfig

        self.hf_config = AutoConfig.from_pretrained(path, trust_remote_code=self.trust_remote_code,
                                                    local_files_only=True)
        from vllm.platforms import current_platform

        cfg_dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        self.dtype = resolve_dtype(self.dtype, cfg_dtype, on_gpu=current_platform().is_cuda())
        self.max_model_len = self._resolve_max_model_len(self.max_model_len)
        from vllm.model_executor.layers.quantization import get_quantization_config

        self.quant_config = get_quantization_config(self.hf_config, self.quantization)

    def _resolve_max_model_len(self, requested: Optional[int]) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None)
        if requested is None:
            if limit is None:
                raise ValueError(f"{self.model}: config.json has no max_position_embeddings; pass max_model_len")
            return int(limit)
        if requested < 1:
            raise ValueError(f"max_model_len must be positive, got {requested}")
        if limit is not None and requested > limit:
            raise ValueError(f"max_model_len {requested} is larger than the model's max_position_embeddings "
                             f"({limit})")
        return int(requested)

    @property
    def architectures(self) -> list[str]:
        return list(getattr(self.hf_config, "architectures", None) or [])

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        """Total KV heads (before any tensor-parallel split)."""
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def eos_token_id(self) -> Optional[int | list[int]]:
        return getattr(self.hf_config, "eos_token_id", None)
