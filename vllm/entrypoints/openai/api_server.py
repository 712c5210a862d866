"""The OpenAI-compatible HTTP server behind ``vllm serve`` (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import torch

import vllm
from vllm import envs
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.entrypoints.openai.http_middleware import DEFAULT_MAX_BODY_BYTES, ServerMiddleware, ServerState
from vllm.entrypoints.openai.lora_resolver import FilesystemLoRAResolver, resolver_dir
from vllm.entrypoints.openai.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, build_metrics
from vllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                              LoadLoRAAdapterRequest, TokenizeChatRequest, TokenizeCompletionRequest,
                                              UnloadLoRAAdapterRequest)
from vllm.entrypoints.openai.request_logging import StatsLogger
from vllm.entrypoints.openai.security import AdapterPathError, AdapterPathPolicy
from vllm.entrypoints.openai.serving import APIError, Models, Serving, not_found
from vllm.logger import init_logger
from vllm.transformers_utils.tokenizer import load_chat_template

logger = init_logger(__name__)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _json_error_message(err: dict, doc: Any) -> str:
    """Why and where the body is not valid JSON (line and column when the text is at hand)."""
    pos = err.get("loc", (None, None))[-1]
    where = f" at character {pos}"
    if isinstance(doc, str) and isinstance(pos, int):
        line, start = doc.count("\n", 0, pos) + 1, doc.rfind("\n", 0, pos) + 1
        where = f" at line {line} column {pos - start + 1} (character {pos})"
    reason = (err.get("ctx") or {}).get("error", "JSON decode error")
    return f"the request body is not valid JSON: {reason}{where}; send one JSON object"


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    parts, param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return _json_error_message(err, getattr(exc, "body", None)), None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if err.get("type") == "string_unicode":  # e.g. a field name holding a lone surrogate
            msg = f"{ascii(err.get('input'))[:80]} is not valid Unicode (a lone surrogate); send valid UTF-8"
        parts.append(f"{'.'.join(loc) or 'body'}: {msg}")
    return "; ".join(parts) or "invalid request", param


async def _until_disconnect(request: Request, coro) -> Any:
    """Run ``coro``; cancel it (aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise APIError("client disconnected", 499, "ClientDisconnected")
    finally:
        if not task.done():
            task.cancel()


def build_app(engine: AsyncLLMEngine, models: Models, api_key: Optional[str] = None, *,
              state: Optional[ServerState] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              adapter_paths: Optional[AdapterPathPolicy] = None,
              stats_interval: Optional[float] = None, max_logprobs: Optional[int] = None,
              cors: Optional[dict[str, Any]] = None, root_path: Optional[str] = None) -> FastAPI:
    """The app.  ``adapter_paths``: where runtime loads may read adapters (None: nowhere);
    ``stats_interval``: seconds between stats lines while busy (None: no stats lines);
    ``max_logprobs``: the most logprobs a request may ask for (None: the engine's 20);
    ``cors``: keyword arguments of Starlette's ``CORSMiddleware`` (None: no CORS headers);
    ``root_path``: the prefix a proxy serves the app under (FastAPI's ``root_path``)."""
    state = state or ServerState()
    adapter_paths = adapter_paths or AdapterPathPolicy([])

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        stats = StatsLogger(engine, stats_interval) if stats_interval else None
        if stats is not None:
            stats.start()
        try:
            yield
        finally:
            if stats is not None:
                await stats.stop()

    app = FastAPI(title="vllm OpenAI-compatible server", version=vllm.__version__, lifespan=lifespan,
                  root_path=root_path or "")
    app.add_middleware(ServerMiddleware, state=state, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors is not None:  # added last: outermost, so a preflight is answered before the API-key check
        app.add_middleware(CORSMiddleware, **cors)
    serving = Serving(engine, models)
    if max_logprobs is not None:
        serving.max_logprobs = max_logprobs
    server_metrics = build_metrics(engine, models.base_names[0], models.max_model_len,
                                   lambda: len(models.adapters), lambda: dict(state.http_requests))

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return _error(APIError(msg, 400, "BadRequestError", param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
        detail = str(exc.detail)
        if exc.status_code == 400 and exc.__cause__ is not None:  # e.g. a 5000-digit number in the body
            detail = f"{detail}: {exc.__cause__}"
        return _error(APIError(detail, exc.status_code, kind))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        logger.exception("request failed")  # the details stay in the log: they may hold server paths
        return _error(APIError(f"internal error ({type(exc).__name__}); the server logged the details",
                               500, "InternalServerError"))

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return _error(APIError("the engine is not running", 503, "ServiceUnavailable"))
        return PlainTextResponse("")

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping():  # SageMaker's health check, as in vLLM
        return await health()

    @app.get("/version")
    async def version():
        return {"version": vllm.__version__}

    @app.get("/v1/models")
    async def list_models():
        listing = models.listing().model_dump()
        for card in listing["data"]:  # names, never the server's paths
            card["root"] = card["id"]
        return listing

    async def respond(request: Request, result):
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream")
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.stream:
            return await respond(request, await serving.completions(body))
        return await respond(request, await _until_disconnect(request, serving.completions(body)))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        if body.stream:
            return await respond(request, await serving.chat(body))
        return await respond(request, await _until_disconnect(request, serving.chat(body)))

    @app.post("/tokenize")
    async def tokenize(body: Union[TokenizeChatRequest, TokenizeCompletionRequest]):
        return JSONResponse(await serving.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return JSONResponse(await serving.detokenize(body))

    def _runtime_updates_allowed() -> None:
        if not envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
            raise APIError("loading and unloading LoRA adapters at run time is disabled; start the server with "
                           "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", 403, "PermissionDenied")

    loading: set[str] = set()  # names reserved by loads in progress

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        _runtime_updates_allowed()
        name, given = body.lora_name, body.lora_path
        if name in models.adapters or name in models.base_names or name in loading:
            raise APIError(f"the adapter {name!r} is already loaded (or being loaded)", param="lora_name")
        loading.add(name)  # reserved before the first await: a concurrent load of the name gets a 400
        try:
            try:
                path = adapter_paths.resolve(given)
            except AdapterPathError as e:
                raise APIError(f"failed to load adapter {name!r}: {e}", param="lora_path") from None
            req = models.new_lora(name, path)
            try:
                await engine.add_lora(req)
            except Exception as e:  # bad files: refused, the server goes on
                msg = AdapterPathPolicy.public_message(str(e), path, given)
                raise APIError(f"failed to load adapter {name!r} from {given!r}: {msg}", param="lora_path") from e
            models.adapters[name] = req
        finally:
            loading.discard(name)
        logger.info("loaded LoRA adapter %s from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        _runtime_updates_allowed()
        req = models.adapters.get(body.lora_name)
        if req is None:
            raise not_found(f"the adapter {body.lora_name!r} is not loaded", "lora_name")
        del models.adapters[body.lora_name]
        await engine.remove_lora(req.lora_int_id)
        logger.info("unloaded LoRA adapter %s", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/metrics")
    async def metrics():
        return Response(server_metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    """The engine's arguments from ``vllm serve``'s flags (the parser's defaults are EngineArgs')."""
    return EngineArgs(model=args.model, tokenizer=args.tokenizer, revision=args.revision,
                      tokenizer_revision=args.tokenizer_revision, generation_config=args.generation_config,
                      dtype=args.dtype, seed=args.seed,
                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                      usage_context="openai_api_server",
                      enable_prefix_caching=args.enable_prefix_caching,
                      gpu_memory_utilization=args.gpu_memory_utilization,
                      tensor_parallel_size=args.tensor_parallel_size, enable_lora=args.enable_lora,
                      enable_expert_parallel=args.enable_expert_parallel,
                      max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
                      fully_sharded_loras=args.fully_sharded_loras, trust_remote_code=args.trust_remote_code,
                      quantization=args.quantization,
                      moe_backend=None if args.moe_backend == "auto" else args.moe_backend,
                      enforce_eager=args.enforce_eager, cuda_graph_sizes=args.cuda_graph_sizes,
                      async_scheduling=args.async_scheduling)


def _start_engine(args: argparse.Namespace, models_root: str) -> tuple[AsyncLLMEngine, Models]:
    """The engine with the start-up adapters loaded; any failure shuts it down again and raises."""
    names = args.served_model_name or [args.model]
    for module in args.lora_modules or []:
        if module.base_model_name is not None and module.base_model_name not in names:
            raise ValueError(f"--lora-modules {module.name}: base_model_name {module.base_model_name!r} is not a "
                             f"served model name ({', '.join(names)}); leave it out or use one of them")
    chat_template = load_chat_template(args.chat_template) if args.chat_template else None
    engine = AsyncLLMEngine.from_engine_args(engine_args_from(args))  # a model not found: a clear error
    try:
        model_dtype = engine.engine.model_config.dtype
        if args.lora_dtype != "auto" and getattr(torch, args.lora_dtype) != model_dtype:
            raise ValueError(f"--lora-dtype {args.lora_dtype} is not supported with a {model_dtype} model: the "
                             "LoRA kernels compute in the model's dtype; use --lora-dtype auto (or --dtype "
                             f"{args.lora_dtype} for the whole model)")
        if chat_template is not None:
            engine.engine.tokenizer.chat_template = chat_template  # what /v1/chat/completions renders
        models = Models(names, models_root, engine.engine.model_config.max_model_len)
        for name, path, base in args.lora_modules or []:
            logger.info("loading LoRA adapter %s from %s", name, path)
            req = models.new_lora(name, path, base)
            try:
                asyncio.run(engine.add_lora(req))
            except Exception as e:
                raise ValueError(f"--lora-modules {name}={path}: {e}") from e
            models.adapters[name] = req
    except BaseException:
        engine.shutdown()
        raise
    return engine, models


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; the exit code (1: the server could not start)."""
    from vllm.entrypoints.openai.launcher import bind_socket, serve_http
    from vllm.entrypoints.openai.request_logging import LoggingEngine

    if args.lora_modules and not args.enable_lora:
        logger.error("--lora-modules needs --enable-lora")
        return 1
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s; choose another --port (or stop what uses it)",
                     args.host, args.port, e.strerror or e)
        return 1
    try:
        adapter_paths = AdapterPathPolicy.for_server(args.lora_allowed_dirs,
                                                     [m.path for m in args.lora_modules or []])
        resolve_from = resolver_dir(args.lora_resolver_dir)
        if resolve_from is not None and not args.enable_lora:
            raise ValueError("loading adapters on demand (--lora-resolver-dir, VLLM_PLUGINS=lora_filesystem_resolver) "
                             "needs --enable-lora")
        logger.info("vllm %s: starting the engine for %s", vllm.__version__, args.model)
        engine, models = _start_engine(args, (args.served_model_name or [args.model])[0])
        if resolve_from is not None:
            bases = [args.model, engine.engine.model_config.model, *models.base_names]
            models.enable_resolver(FilesystemLoRAResolver(resolve_from, bases), engine.add_lora)
            logger.info("adapters unknown by name are loaded on first use from %s", resolve_from)
    except Exception as e:  # a start-up error: its message, not a traceback (that is at DEBUG)
        logger.debug("start-up failed", exc_info=True)
        logger.error("the server cannot start: %s", e)
        sock.close()
        return 1
    if envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
        logger.info("runtime adapter loads may read from: %s",
                    ", ".join(adapter_paths.allowed_dirs) or "nowhere (pass --lora-allowed-dirs)")
    if args.disable_log_requests:  # as in vLLM, where request logs are off unless --enable-log-requests
        logger.warning("--disable-log-requests is deprecated, as in vLLM (whose default is no request logs); it is "
                       "honoured: no per-request log lines")
    logged = LoggingEngine(engine, log_requests=not args.disable_log_requests, max_log_len=args.max_log_len)
    state = ServerState()
    app = build_app(logged, models, args.api_key, state=state, max_body_bytes=args.max_request_body_bytes,
                    adapter_paths=adapter_paths,
                    stats_interval=None if args.disable_log_stats else envs.VLLM_LOG_STATS_INTERVAL,
                    max_logprobs=args.max_logprobs, root_path=args.root_path,
                    cors=dict(allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                              allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials))
    served = ", ".join(models.base_names + list(models.adapters))

    def ready() -> None:
        logger.info("ready: serving %s on http://%s:%d (routes: /v1/models, /v1/completions, "
                    "/v1/chat/completions, /tokenize, /detokenize, /health, /ping, /version, /metrics)",
                    served, args.host, args.port)

    try:
        asyncio.run(serve_http(app, sock, state, args.shutdown_timeout, ready, args.uvicorn_log_level))
    finally:
        engine.shutdown()
        logger.info("server stopped")
    return 0
