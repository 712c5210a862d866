"""The package logger: ``init_logger(__name__)`` gives a child of ``vllm``."""
from __future__ import annotations

import logging
import sys

_ROOT = "vllm"
_configured = False


def _configure_root() -> None:
    global _configured
    if _configured:
        return
    from vllm import envs

    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s", "%m-%d %H:%M:%S")
        )
        root.addHandler(handler)
    root.setLevel(envs.VLLM_LOGGING_LEVEL.upper())
    root.propagate = True  # lets pytest's caplog see records
    _configured = True


def init_logger(name: str) -> logging.Logger:
    _configure_root()
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")
