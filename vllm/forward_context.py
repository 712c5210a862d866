"""Per-step metadata that every attention layer of a forward needs.

The model runner wraps each forward in ``with set_forward_context(meta):``;
attention layers read it with ``get_forward_context()``.  It is scoped (reset
on exit, also on error), so no state leaks between steps or tests.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

from vllm.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata


_current: Optional[ForwardContext] = None


@contextlib.contextmanager
def set_forward_context(attn_metadata: AttentionMetadata) -> Iterator[ForwardContext]:
    global _current
    prev = _current
    _current = ForwardContext(attn_metadata=attn_metadata)
    try:
        yield _current
    finally:
        _current = prev


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("no forward context: run the model inside `with set_forward_context(metadata):` "
                           "(the model runner does this; tests can use vllm.attention.metadata.build_metadata)")
    return _current
