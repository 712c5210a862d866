"""``LoRARequest``: which adapter a request wants, as in upstream vLLM.

    LoRARequest("sql-adapter", 1, "/adapters/sql")        # vLLM's positional order
    LoRARequest(lora_name="sql-adapter", lora_int_id=1, lora_path="/adapters/sql")

``lora_int_id`` identifies the adapter everywhere in the engine (0 means "no
adapter" in per-token mappings, so ids start at 1).  Two requests are equal,
and hash alike, exactly when their ids are equal: the name and path describe
the adapter, the id is its identity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(eq=False)
class LoRARequest:
    """lora_name: a human-readable name (shown in logs and by the server's /v1/models).
    lora_int_id: unique integer id >= 1.
    lora_path: local folder holding ``adapter_config.json`` + ``adapter_model.safetensors``.
    lora_local_path: deprecated alias of ``lora_path`` (older vLLM releases, 4th positional).
    base_model_name: optional name of the base model the adapter was trained on.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_local_path: Optional[str] = field(default=None, repr=False)
    base_model_name: Optional[str] = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int):
            raise TypeError(f"lora_int_id must be an int, got {type(self.lora_int_id).__name__} "
                            f"({self.lora_int_id!r})")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1 (0 means 'no adapter'), got {self.lora_int_id} "
                             f"for adapter {self.lora_name!r}")
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if self.lora_local_path is not None:
            if self.lora_path and self.lora_path != self.lora_local_path:
                raise ValueError(f"lora_path={self.lora_path!r} and lora_local_path={self.lora_local_path!r} "
                                 "disagree; give only lora_path")
            self.lora_path = self.lora_local_path
            self.lora_local_path = None
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"adapter {self.lora_name!r} (id {self.lora_int_id}) needs lora_path, "
                             "the folder holding adapter_config.json and adapter_model.safetensors")

    # Names used by vLLM's adapter-generic code.
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_int_id == other.lora_int_id

    def __hash__(self) -> int:
        return hash(self.lora_int_id)
