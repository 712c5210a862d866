"""The ``vllm`` command: ``vllm serve MODEL [options]``, ``vllm --version``.

Also runnable as ``python -m vllm.entrypoints.cli serve ...``.  The server (FastAPI,
uvicorn) is imported only when ``serve`` runs, so the package works without them.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NamedTuple, Optional, Sequence

KV_CACHE_DTYPES = ("auto",)
LORA_DTYPES = ("auto", "float16", "bfloat16", "float32")
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class LoRAModule(NamedTuple):
    """One ``--lora-modules`` entry; ``base_model_name`` (vLLM's JSON form) must be a served name."""

    name: str
    path: str
    base_model_name: Optional[str] = None


def _lora_module(text: str) -> LoRAModule:
    """``name=path``, or vLLM's JSON ``{"name": ..., "path": ..., "base_model_name": ...}``."""
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--lora-modules entry {text!r} is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise argparse.ArgumentTypeError(f"--lora-modules JSON entries are objects, got {text!r}")
        unknown = sorted(set(obj) - {"name", "path", "base_model_name"})
        if unknown:
            raise argparse.ArgumentTypeError(f"--lora-modules entry {text!r} has unknown key(s) {', '.join(unknown)}; "
                                             "the keys are name, path and base_model_name")
        name, path, base = obj.get("name"), obj.get("path"), obj.get("base_model_name")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise argparse.ArgumentTypeError(f"--lora-modules entry {text!r} needs non-empty string "
                                             "\"name\" and \"path\"")
        if base is not None and not isinstance(base, str):
            raise argparse.ArgumentTypeError(f"--lora-modules entry {text!r}: base_model_name must be a string")
        return LoRAModule(name, path, base)
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules entries are name=path or JSON "
                                         f"{{\"name\": ..., \"path\": ..., \"base_model_name\": ...}}, got {text!r}")
    return LoRAModule(name, path)


def _json_list(text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON list such as '[\"*\"]', got {text!r}: {e}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings such as '[\"*\"]', got {text!r}")
    return value


def _kv_cache_dtype(text: str) -> str:
    if text not in KV_CACHE_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not supported: only 'auto' (the KV cache in the model's "
                                         "dtype) is; this engine has no quantised (fp8) KV-cache kernels")
    return text


def _max_logprobs(text: str) -> int:
    from vllm.sampling_params import MAX_LOGPROBS

    value = int(text)
    if not 0 <= value <= MAX_LOGPROBS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_LOGPROBS} (the most logprobs the engine "
                                         f"returns per position), got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def make_parser() -> argparse.ArgumentParser:
    import vllm

    parser = argparse.ArgumentParser(prog="vllm", description="vllm command-line interface")
    parser.add_argument("--version", action="version", version=vllm.__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server",
                           description="Serve MODEL (and LoRA adapters) over an OpenAI-compatible HTTP API.")
    serve.add_argument("model", metavar="MODEL", help="folder of the model (config, weights, tokenizer), or a "
                       "Hugging Face hub id (Org/Name) in the local hub cache (HF_HUB_CACHE; nothing is downloaded)")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every /v1 route (compared in constant time); "
                            "/health, /metrics and /version stay open, as in vLLM")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) of the base model in the API (default: MODEL)")
    serve.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    serve.add_argument("--lora-modules", nargs="+", action="extend", type=_lora_module, default=None, metavar="NAME=PATH",
                       help="adapters to serve, each as name=path or as JSON {\"name\": ..., \"path\": ..., "
                            "\"base_model_name\": ...} (the flag may be repeated)")
    serve.add_argument("--lora-dtype", choices=LORA_DTYPES, default="auto",
                       help="dtype of the adapters' weights on the device: auto (the model's dtype) or that same "
                            "dtype; another one is refused (the LoRA kernels compute in the model's dtype)")
    serve.add_argument("--lora-allowed-dirs", nargs="+", action="extend", default=None, metavar="DIR",
                       help="directories runtime adapter loads (POST /v1/load_lora_adapter) may read from; paths "
                            "are resolved (symlinks too) and must stay inside; relative paths are looked up in "
                            "these directories (default: the folders holding the --lora-modules adapters; none: "
                            "runtime loads are refused)")
    serve.add_argument("--lora-resolver-dir", default=None, metavar="DIR",
                       help="load an adapter the server does not know on its first request, from DIR/<model name> "
                            "when its adapter_config.json names this base model (vLLM's lora_filesystem_resolver; "
                            "also VLLM_PLUGINS=lora_filesystem_resolver with VLLM_LORA_RESOLVER_CACHE_DIR=DIR)")
    serve.add_argument("--max-loras", type=int, default=1, help="adapters in one batch (default: 1)")
    serve.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank (default: 16)")
    serve.add_argument("--max-cpu-loras", type=int, default=None, help="adapters cached on the CPU")
    serve.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    serve.add_argument("--max-num-seqs", type=int, default=256, help="sequences per batch (default: 256)")
    serve.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default: auto)")
    serve.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    serve.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model's)")
    serve.add_argument("--revision", default=None,
                       help="for a hub id: the branch, tag or commit of the locally cached snapshot (default: main)")
    serve.add_argument("--tokenizer-revision", default=None, help="the same for a hub-id --tokenizer "
                       "(default: --revision)")
    serve.add_argument("--generation-config", default="auto",
                       help="'auto': default sampling parameters and extra EOS ids from the model's "
                            "generation_config.json (for the fields a request leaves unset); 'vllm': no sampling "
                            "defaults from it; or a folder holding a generation_config.json (default: auto)")
    serve.add_argument("--chat-template", default=None, metavar="PATH_OR_TEMPLATE",
                       help="chat template for /v1/chat/completions instead of the tokenizer's: a file path or the "
                            "Jinja text itself")
    serve.add_argument("--quantization", "-q", default=None,
                       help="the checkpoint's quantization method (gptq, awq, compressed-tensors); optional, read "
                            "from its quantization_config, and refused when it does not match")
    serve.add_argument("--trust-remote-code", action="store_true",
                       help="let transformers run code shipped with the model's config / tokenizer")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="fraction of GPU memory the engine may use, KV cache included (default: 0.9)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="tokens per step (default: max(8192, max-model-len))")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                       help="reuse the KV cache of full blocks already computed for the same prompt prefix under "
                            "the same adapter (default: on)")
    serve.add_argument("--fully-sharded-loras", action="store_true",
                       help="with tensor parallelism, also split the MoE LoRA rank dimension over the ranks")
    serve.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                       help="ranks to shard the model over: one GPU each (the first N visible), or N processes on CPU")
    serve.add_argument("--enable-expert-parallel", action="store_true",
                       help="split the MoE experts over the tensor-parallel ranks (whole experts per rank) instead of "
                            "splitting every expert; attention and dense layers stay tensor-parallel")
    serve.add_argument("--moe-backend", default="auto",
                       help="MoE experts backend (e.g. triton, torch); auto: the fastest that can run the model "
                            "(and its LoRA adapters)")
    serve.add_argument("--kv-cache-dtype", type=_kv_cache_dtype, default="auto",
                       help="only auto (the model's dtype) is supported")
    serve.add_argument("--max-logprobs", type=_max_logprobs, default=20,
                       help="most logprobs (and prompt logprobs) a request may ask for per position (default: 20)")
    serve.add_argument("--enforce-eager", action="store_true", help="run decode steps eagerly (no CUDA graphs)")
    serve.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None, metavar="N",
                       help="decode batch sizes to capture as CUDA graphs (default: a ladder up to --max-num-seqs)")
    serve.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="queue each decode step before the previous step's tokens are read, so the host work "
                            "of a step overlaps the GPU work of the next (same outputs; tensor parallel size 1). "
                            "Default: on with one CUDA GPU (as vLLM since 0.14), off on CPU")
    ops = serve.add_argument_group("server operation")
    ops.add_argument("--max-request-body-bytes", type=_positive_int, default=8 * 1024 * 1024, metavar="N",
                     help="refuse request bodies larger than N bytes with 413 (default: 8 MiB)")
    ops.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, how long requests in flight may finish before they are aborted "
                          "(default: 30)")
    log_requests = ops.add_mutually_exclusive_group()
    log_requests.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    log_requests.add_argument("--enable-log-requests", action="store_true",
                              help="a log line per request (the default here; accepted as in vLLM)")
    ops.add_argument("--uvicorn-log-level", choices=UVICORN_LOG_LEVELS, default="warning",
                     help="uvicorn's log level (default: warning)")
    ops.add_argument("--root-path", default=None,
                     help="the path prefix under which a proxy serves the app (FastAPI's root_path)")
    ops.add_argument("--allowed-origins", type=_json_list, default=["*"], metavar="JSON",
                     help='CORS allowed origins, a JSON list (default: ["*"])')
    ops.add_argument("--allowed-methods", type=_json_list, default=["*"], metavar="JSON",
                     help='CORS allowed methods, a JSON list (default: ["*"])')
    ops.add_argument("--allowed-headers", type=_json_list, default=["*"], metavar="JSON",
                     help='CORS allowed headers, a JSON list (default: ["*"])')
    ops.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    ops.add_argument("--max-log-len", type=int, default=None, metavar="N",
                     help="also log the first N characters of each prompt (default: no prompt text)")
    ops.add_argument("--disable-log-stats", action="store_true",
                     help="no periodic throughput / load line (every VLLM_LOG_STATS_INTERVAL seconds while busy)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            from vllm.entrypoints.openai.api_server import run_server
        except ImportError as e:
            parser.exit(1, f"vllm serve needs the server extras ({e.name} is missing): "
                           "pip install 'vllm[serve]'\n")
        return run_server(args)
    parser.print_help()
    return 1


if __name__ == "__main__":
    sys.exit(main())
