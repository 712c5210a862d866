"""Every ``VLLM_*`` environment variable the package reads, typed, in one place.

Read them through this module (``from vllm import envs; envs.VLLM_X``) at the
edges - engine construction, backend selection - never deep inside kernels.
Each access re-reads the environment, so tests can monkeypatch ``os.environ``.
"""
from __future__ import annotations

import os
from typing import Any, Callable


def _bool(name: str, default: bool) -> Callable[[], bool]:
    def get() -> bool:
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return default
        val = raw.strip().lower()
        if val in ("1", "true", "yes", "on"):
            return True
        if val in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={raw!r} is not a boolean; use 1/0 or true/false")

    return get


def _str(name: str, default: str | None) -> Callable[[], str | None]:
    def get() -> str | None:
        raw = os.environ.get(name)
        return default if raw in (None, "") else raw

    return get


def _choice(name: str, default: str | None, choices: tuple[str, ...]) -> Callable[[], str | None]:
    def get() -> str | None:
        raw = os.environ.get(name)
        if raw in (None, ""):
            return default
        val = raw.strip().lower()
        if val not in choices:
            raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
        return val

    return get


def _float(name: str, default: float, minimum: float) -> Callable[[], float]:
    def get() -> float:
        raw = os.environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            val = float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
        if not val >= minimum or val == float("inf"):
            raise ValueError(f"{name}={raw!r} must be a finite number >= {minimum}")
        return val

    return get


environment_variables: dict[str, Callable[[], Any]] = {
    # Logging level of the ``vllm`` logger (DEBUG, INFO, WARNING, ERROR).
    "VLLM_LOGGING_LEVEL": _str("VLLM_LOGGING_LEVEL", "INFO"),
    # Folder of tuned kernel-config JSON files for the MoE LoRA kernels; when
    # unset (or no file matches the shape and GPU), a heuristic picks tiles.
    "VLLM_TUNED_CONFIG_FOLDER": _str("VLLM_TUNED_CONFIG_FOLDER", None),
    # Force a fused-MoE experts backend by name (see
    # ``vllm.model_executor.layers.fused_moe.oracle``); unset = automatic.
    "VLLM_FUSED_MOE_BACKEND": _str("VLLM_FUSED_MOE_BACKEND", None),
    # Force the platform ("cuda" or "cpu") instead of detecting it.
    "VLLM_TARGET_DEVICE": _choice("VLLM_TARGET_DEVICE", None, ("cuda", "cpu")),
    # Paged-attention backend of the Attention layers: "triton" or "torch";
    # unset = Triton when a CUDA GPU is available, torch otherwise.  Read once
    # per layer, when the layer is constructed.
    "VLLM_ATTENTION_BACKEND": _choice("VLLM_ATTENTION_BACKEND", None, ("triton", "torch")),
    # Allow loading / unloading LoRA adapters at run time through the server.
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": _bool("VLLM_ALLOW_RUNTIME_LORA_UPDATING", False),
    # Comma-separated vLLM plugins to load; only "lora_filesystem_resolver" exists here
    # (adapters loaded by name on first use, see vllm/entrypoints/openai/lora_resolver.py).
    "VLLM_PLUGINS": _str("VLLM_PLUGINS", None),
    # The directory the lora_filesystem_resolver plugin loads adapters from (DIR/<name>).
    "VLLM_LORA_RESOLVER_CACHE_DIR": _str("VLLM_LORA_RESOLVER_CACHE_DIR", None),
    # How tensor-parallel workers start: "fork" or "spawn"; unset: fork unless CUDA is
    # already initialised in this process (then spawn), as vLLM.
    "VLLM_WORKER_MULTIPROC_METHOD": _choice("VLLM_WORKER_MULTIPROC_METHOD", None, ("fork", "spawn")),
    # Seconds one tensor-parallel collective may wait for the other ranks before it fails (gloo and
    # NCCL): a rank that hangs or dies mid-step fails the engine within this, instead of a hang.
    "VLLM_COLLECTIVE_TIMEOUT": _float("VLLM_COLLECTIVE_TIMEOUT", 600.0, minimum=1.0),
    # Seconds between the server's throughput / load log lines while it is busy.
    "VLLM_LOG_STATS_INTERVAL": _float("VLLM_LOG_STATS_INTERVAL", 10.0, minimum=0.1),
    # Dense LoRA layers on CUDA run their projection and LoRA delta as one Triton launch for batches of
    # <= 16 tokens (vllm/lora/ops/triton_ops/fused_linear_lora.py); "0" keeps F.linear + the LoRA op.
    # Read when a layer gets its Punica wrapper (engine start).
    "VLLM_FUSED_LORA_LINEAR": _bool("VLLM_FUSED_LORA_LINEAR", False),
    # Programmatic dependent launch (sm_90+): the decode path's Triton kernels are launched so that each
    # may start while the kernel before it drains, and wait for its results in the kernel
    # (vllm/platforms/pdl.py); "0" launches them plainly.  Read once per device.
    "VLLM_PDL": _bool("VLLM_PDL", True),
    # The CUDA C++ kernels of csrc/capi (vllm/platforms/cuda_lib.py): "0" never builds or loads them;
    # VLLM_CSRC_CACHE: where the built library is kept (default ~/.cache/vllm-moe-lora/csrc);
    # VLLM_CSRC_FLAGS: more nvcc flags, part of the library's cache key.
    "VLLM_CSRC": _bool("VLLM_CSRC", True),
    "VLLM_CSRC_CACHE": _str("VLLM_CSRC_CACHE", None),
    "VLLM_CSRC_FLAGS": _str("VLLM_CSRC_FLAGS", None),  # extra nvcc flags (kernel variants to time)
    # int4 experts repacked at load for the tensor-core kernel (ops/int4_mma_moe.py, csrc/capi) on CUDA where it
    # builds and takes the format (not act-order; bf16 / fp16): one 4-bit copy, every launch on that kernel or
    # the dequant path; "0" keeps the Triton kernels.
    "VLLM_INT4_MMA": _bool("VLLM_INT4_MMA", True),
    # MXFP4 experts likewise (ops/mxfp4_mma_moe.py; bf16 activations, N % 16 == 0, K % 64 == 0); "0" keeps the
    # Triton kernels on the checkpoint's blocks.
    "VLLM_MXFP4_MMA": _bool("VLLM_MXFP4_MMA", True),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
