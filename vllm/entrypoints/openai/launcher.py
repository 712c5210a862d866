"""Binding the port and running uvicorn with the server's own signal handling and drain.

``bind_socket`` binds before anything is logged as ready (a taken port is a clear
error, not a "ready" line followed by a crash).  ``serve_http`` runs
``uvicorn.Server`` on that socket and logs "ready" once it listens.

On SIGTERM or SIGINT the server stops accepting connections and lets the requests in
flight finish for up to ``shutdown_timeout`` seconds; then it aborts the rest (a
request whose response has not started gets a 503; streams are cut, which aborts
their engine requests) and logs how many.  A second signal stops at once.
uvicorn's own handlers are not installed: they re-raise the signal after the
shutdown, which killed the process before the caller could shut the engine down.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from typing import Any, Callable, Iterator

import uvicorn

from vllm.entrypoints.openai.http_middleware import ServerState
from vllm.logger import init_logger

logger = init_logger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; ``OSError`` says why it cannot be."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # serve_http installs its handlers instead
        yield


async def serve_http(app: Any, sock: socket.socket, state: ServerState, shutdown_timeout: float,
                     on_ready: Callable[[], None], log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until a signal and the drain are done (uvicorn logging at ``log_level``)."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    server = _Server(config)
    loop = asyncio.get_running_loop()

    def drain_expired() -> None:
        state.aborting = True
        if state.in_flight:
            logger.warning("shutdown: %d request(s) still in flight after %gs (--shutdown-timeout); aborting them",
                           state.in_flight, shutdown_timeout)

    def on_signal(sig: signal.Signals) -> None:
        if server.should_exit:
            logger.warning("%s again: stopping now", sig.name)
            state.aborting = True
            server.force_exit = True
            return
        logger.info("%s: no longer accepting connections; waiting up to %gs for %d request(s) in flight",
                    sig.name, shutdown_timeout, state.in_flight)
        server.should_exit = True
        loop.call_later(shutdown_timeout, drain_expired)

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        on_ready()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    ready = loop.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        ready.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
