"""The server's one HTTP middleware, written against ASGI directly.

Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) hands the route a
receive channel that never reports the client's disconnect, so a non-streamed
request whose client went away ran to its end.  This middleware passes ``receive``
through (after the body), so ``Request.is_disconnected()`` works in the routes.

Per HTTP request, in order:

1. ``/v1/*`` needs ``Authorization: Bearer <api key>`` when the server has a key
   (compared in constant time); ``/health``, ``/metrics`` and ``/version`` stay open.
2. The body may hold at most ``max_body_bytes``: a larger ``Content-Length`` is
   refused before any of the body is read, and a body without one is counted while it
   arrives and refused as soon as it passes the limit (413, OpenAI's error shape).
3. ``/v1/*`` requests are counted by route and status (``vllm:http_requests_total``).
4. While the server shuts down (``ServerState.aborting``), a request cancelled because
   the drain timeout passed gets a 503 if its response had not started.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from vllm.entrypoints.openai.security import api_key_matches
from vllm.logger import init_logger

logger = init_logger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class ServerState:
    """What the middleware counts, read by /metrics, the stats logger and the shutdown."""

    http_requests: dict[tuple[str, int], int] = field(default_factory=dict)
    in_flight: int = 0  # /v1 requests whose response has not ended
    aborting: bool = False  # set when the drain timeout has passed: cancelled requests get a 503


def error_body(message: str, status: int, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": status}}).encode()


async def send_json_error(send: Send, status: int, message: str, type_: str) -> None:
    body = error_body(message, status, type_)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class _TooLarge(Exception):
    pass


class ServerMiddleware:
    def __init__(self, app: ASGIApp, *, state: ServerState, api_key: Optional[str] = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.state = state
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> str:
        return (f"the request body is larger than {self.max_body_bytes} bytes, this server's limit "
                "(--max-request-body-bytes); send a smaller request")

    async def _read_body(self, receive: Receive) -> list[Message]:
        """The body's messages, refused (``_TooLarge``) as soon as they pass the limit."""
        messages, size = [], 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                return messages  # the client went away: the route sees it
            size += len(msg.get("body", b""))
            if size > self.max_body_bytes:
                raise _TooLarge
            if not msg.get("more_body", False):
                return messages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        v1 = path.startswith("/v1")
        if v1 and self.api_key and not api_key_matches(_header(scope, b"authorization"), self.api_key):
            await send_json_error(send, 401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                  "AuthenticationError")
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await send_json_error(send, 400, f"invalid Content-Length header {length!r}", "BadRequestError")
                return
            if int(length) > self.max_body_bytes:
                await send_json_error(send, 413, self._too_large(), "RequestTooLargeError")
                return
        try:
            pending = await self._read_body(receive)
        except _TooLarge:
            await send_json_error(send, 413, self._too_large(), "RequestTooLargeError")
            return

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        if not v1:
            await self.app(scope, replay, send)
            return
        await self._counted(scope, replay, send, path)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        started = False
        status = 500

        async def counting_send(msg: Message) -> None:
            nonlocal started, status
            if msg["type"] == "http.response.start":
                started, status = True, msg["status"]
                key = (path, status)
                self.state.http_requests[key] = self.state.http_requests.get(key, 0) + 1
            await send(msg)

        self.state.in_flight += 1
        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:  # answered with a 500 by the outer error middleware
                key = (path, 500)
                self.state.http_requests[key] = self.state.http_requests.get(key, 0) + 1
            raise
        except asyncio.CancelledError:
            if not self.state.aborting:
                raise
            # the drain timeout passed: answer what has not started, then end quietly
            if not started:
                await send_json_error(counting_send, 503, "the server is shutting down; the request was aborted",
                                      "ServiceUnavailable")
        finally:
            self.state.in_flight -= 1
