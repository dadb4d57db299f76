"""The HTTP layer on uvicorn and Starlette: routes, the API key, body limits, answers whole or streamed (SSE), the
access log, and a stop that is bounded.

Starlette routes the requests; uvicorn (h11) runs the connections on one event loop, so a slow or silent client
costs a socket, not a thread. Requests go to the Scheduler, whose generation thread(s) share the model; each
request's events come back to the loop through its own asyncio queue. A client that disconnects, whether its answer
streams or not, cancels its request at the next token.

Stopping (SIGTERM or Ctrl-C): no new connections; idle keep-alive connections, connections still sending their
headers and requests still sending their body are closed or refused at once; the answers being generated or queued
get `shutdown_grace` seconds to finish, then end with a `shutting_down` error; a response still not delivered one
second after that (a client that does not read) is dropped. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lora_tune.serve.backend import Backend
from lora_tune.serve.protocol import ApiError, GenerationRequest, Limits, parse_chat, parse_completion, parse_json
from lora_tune.serve.responses import Reply, model_card, model_list, sse
from lora_tune.serve.worker import Event, Failed, Finished, Job, Piece, Scheduler, Started

log = logging.getLogger("lora_tune.serve")

POST_ROUTES = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completion}
GET_ROUTES = {"/v1/models", "/health"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DISCARD_LIMIT = 16 << 20  # bytes of an oversized body read and dropped so that its sender gets the 413
HEADER_TIMEOUT = 60.0  # seconds a new connection may take to send its request's headers
SEND_MARGIN = 1.0  # seconds after the grace for the last answers to reach their clients
LOG_PATH_LIMIT = 200  # characters of a request path written to the log


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str = "model"
    limits: Limits = Limits()
    max_body_bytes: int = 1 << 20
    max_waiting: int = 64
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish on SIGTERM / Ctrl-C
    max_batch: int = 16  # requests generated at once (transformers; a GGUF has its own slots)


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def log_text(text: str, limit: int = LOG_PATH_LIMIT) -> str:
    """`text` safe for an operator's terminal: control and other non-printable characters escaped (no escape
    sequence from a client reaches the console), cut to `limit` characters."""
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return safe if len(safe) <= limit else safe[:limit] + "..."


class ApiApp:
    """The ASGI application: the API key, the access log, the OpenAI error shape for every refusal, around the
    Starlette routes."""

    def __init__(self, config: ServeConfig, scheduler: Scheduler):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        self.config, self.scheduler, self.created = config, scheduler, int(time.time())
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completion, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.model, methods=["GET"]),
        ]
        handlers = {HTTPException: self._http_error, ApiError: self._api_error, Exception: self._internal_error}
        self.routes = Starlette(routes=routes, exception_handlers=handlers)
        self._stopping = False
        self._readers: set[asyncio.Future[Any]] = set()  # requests still reading their body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        scope["path"] = scope["path"].rstrip("/") or "/"
        status: list[int] = []

        async def tracked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            self._authorize(scope)
            await self.routes(scope, receive, tracked)
        except ApiError as error:
            if not status:
                await self._send_error(tracked, error)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 and is logged; the server keeps serving
            log.exception("request failed")
            if not status:
                error = ApiError(
                    500, f"internal error: {type(exc).__name__}", code="internal_error", kind="server_error"
                )
                await self._send_error(tracked, error)
        finally:
            self._log(scope, status[0] if status else 0)

    def _log(self, scope: Scope, status: int) -> None:
        # The request line and status only: no header, no query string (a client may put a key there), and no
        # control character a client sent (see log_text); the served key is masked whatever its length.
        client = scope.get("client") or ("-", 0)
        path = scope.get("raw_path", b"").split(b"?", 1)[0].decode("latin-1") or scope["path"]
        line = f'{client[0]} "{scope["method"]} {log_text(path)}" {status or "-"}'
        if self.config.api_key:
            line = line.replace(self.config.api_key, "***")
        log.info("%s", line)

    def _authorize(self, scope: Scope) -> None:
        path = scope["path"]
        known = path in POST_ROUTES or path == "/v1/models" or path.startswith("/v1/models/")
        key = self.config.api_key
        if key is None or not known:
            return
        given = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value.decode("latin-1")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        # compare_digest: the time taken says nothing about how much of the key was right. The key is never logged.
        if not hmac.compare_digest(token.encode("latin-1", "replace"), key.encode("ascii")):
            what = "a wrong API key" if token else "no API key (send Authorization: Bearer KEY)"
            raise ApiError(401, what, code="invalid_api_key")

    async def _http_error(self, request: Any, exc: Any) -> Any:
        """Starlette's 404 and 405 in the OpenAI shape."""
        path = request.url.path
        if exc.status_code == 405:
            allowed = "POST" if path in POST_ROUTES else "GET"
            error = ApiError(405, f"{path} takes {allowed}, not {request.method}", code="method_not_allowed")
            return _json(405, error.body(), {"Allow": allowed})
        error = ApiError(404, f"no such endpoint: {request.method} {log_text(path)}", code="not_found")
        return _json(404, error.body())

    async def _api_error(self, request: Any, error: ApiError) -> Any:
        return _json(error.status, error.body(), _extra_headers(error))

    async def _internal_error(self, request: Any, exc: Exception) -> Any:
        # Starlette answers with this, then raises the exception again: __call__ logs it with its traceback.
        error = ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error", kind="server_error")
        return _json(500, error.body())

    async def _send_error(self, send: Send, error: ApiError) -> None:
        await _json(error.status, error.body(), _extra_headers(error))(HTTP_SCOPE, _no_receive, send)

    # Routes

    async def health(self, request: Any) -> Any:
        return _json(200, {"status": "ok"})

    async def models(self, request: Any) -> Any:
        return _json(200, model_list(self.config.model_name, self.created))

    async def model(self, request: Any) -> Any:
        return _json(200, model_card(self._known_model(request.path_params["name"]), self.created))

    async def chat(self, request: Any) -> Any:
        return await self._generate(request, parse_chat)

    async def completion(self, request: Any) -> Any:
        return await self._generate(request, parse_completion)

    def _known_model(self, name: str | None) -> str:
        served = self.config.model_name
        if name is not None and name != served:
            raise ApiError(
                404,
                f"model {log_text(name)!r} is not served here; this server has {served!r}",
                param="model",
                code="model_not_found",
            )
        return served

    async def _generate(self, request: Any, parse: Callable[..., GenerationRequest]) -> Any:
        body = await self._body(request)
        generation = parse(parse_json(body), self.config.limits)
        self._known_model(generation.model)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # on a generation thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = self.scheduler.submit(generation, emit)
        return Answer(job, events, Reply(self.config.model_name, generation.is_chat), generation)

    async def _body(self, request: Any) -> bytes:
        length = request.headers.get("content-length")
        if length is None:
            raise ApiError(411, "a request body needs a Content-Length header", code="length_required")
        if not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise ApiError(400, "Content-Length: not a number of bytes", param="Content-Length", code="invalid_value")
        size, limit = int(length), self.config.max_body_bytes
        if size > limit:
            if size <= DISCARD_LIMIT:  # read it away, so that a client still sending sees the 413, not a reset
                await self._read(request.stream().__aiter__(), drain=True)
            raise ApiError(413, f"the request body is {size:,} bytes; at most {limit:,}", code="too_large")
        return await self._read(request.stream().__aiter__())

    async def _read(self, chunks: Any, drain: bool = False) -> bytes:
        """The body, unless the server starts stopping first (then 503: a slow sender does not hold the stop)."""

        async def collect() -> bytes:
            parts = []
            async for chunk in chunks:
                if not drain:
                    parts.append(chunk)
            return b"".join(parts)

        if self._stopping:
            raise _shutting_down()
        reader = asyncio.ensure_future(collect())
        self._readers.add(reader)
        try:
            return await reader
        except asyncio.CancelledError:
            if self._stopping:
                raise _shutting_down() from None
            raise
        finally:
            self._readers.discard(reader)

    def stop_reading(self) -> None:
        """The server is stopping: requests still sending their body are refused (on the server's loop)."""
        self._stopping = True
        for reader in list(self._readers):
            reader.cancel()


class Answer:
    """The ASGI response for one generation: whole (JSON) or streamed (SSE), written as its events arrive, while
    watching for the client to disconnect (then the request is cancelled)."""

    def __init__(self, job: Job, events: asyncio.Queue[Event], reply: Reply, request: GenerationRequest):
        self.job, self.events, self.reply, self.request = job, events, reply, request
        self.complete = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = asyncio.ensure_future(self._write(send))
        watcher = asyncio.ensure_future(self._watch(receive, writer))
        try:
            await writer
        except asyncio.CancelledError:
            if not watcher.done() or not watcher.result():
                raise  # cancelled from outside (the server stopping), not by a disconnect
        finally:
            watcher.cancel()
            if not self.complete:
                self.job.cancelled.set()  # the client left, or the server gave up on it: stop generating

    async def _watch(self, receive: Receive, writer: asyncio.Future[Any]) -> bool:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.complete:
            self.job.cancelled.set()
            writer.cancel()
            return True
        return False

    async def _write(self, send: Send) -> None:
        first = await self.events.get()
        if isinstance(first, Failed):
            self.complete = True
            await _json(first.error.status, first.error.body(), _extra_headers(first.error))(
                HTTP_SCOPE, _no_receive, send
            )
            return
        assert isinstance(first, Started)
        if self.request.stream:
            await self._stream(send)
        else:
            await self._whole(send)

    async def _whole(self, send: Send) -> None:
        text = []
        while True:
            event = await self.events.get()
            if isinstance(event, Piece):
                text.append(event.text)
                continue
            self.complete = True
            if isinstance(event, Failed):
                body, status = event.error.body(), event.error.status
            else:
                assert isinstance(event, Finished)
                body, status = self.reply.whole("".join(text), event.finish_reason, event.usage), 200
            await _json(status, body)(HTTP_SCOPE, _no_receive, send)
            return

    async def _stream(self, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def write(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        await write(sse(self.reply.chunk(first=True)))
        while True:
            event = await self.events.get()
            if isinstance(event, Piece):
                await write(sse(self.reply.chunk(event.text)))
            elif isinstance(event, Failed):
                self.complete = True
                await write(sse(event.error.body()), more=False)  # headers are gone: the error is an event
                return
            elif isinstance(event, Finished):
                self.complete = True
                data = sse(self.reply.chunk(finish_reason=event.finish_reason))
                if self.request.include_usage:
                    data += sse(self.reply.usage_chunk(event.usage))
                await write(data + sse("[DONE]"), more=False)
                return


HTTP_SCOPE = {"type": "http"}  # what a Starlette Response needs of the scope to write itself


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    data = json.dumps(body, ensure_ascii=False).encode()
    return Response(data, status_code=status, headers=headers, media_type="application/json")


def _extra_headers(error: ApiError) -> dict[str, str] | None:
    if error.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if error.status in (411, 413):
        return {"Connection": "close"}
    return None


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any weights are read: a busy port or a bad host is a one-line error at
    once, not after minutes of loading. Raises OSError with the reason (the caller names the address)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _uvicorn_server(app: ApiApp, config: ServeConfig) -> Any:
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        """uvicorn's h11 protocol, closing a new connection that has not sent its headers in HEADER_TIMEOUT
        seconds (uvicorn times out only idle keep-alive connections)."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT, self._headers_late)

        def _headers_late(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    class Server(uvicorn.Server):
        """uvicorn's server with lora-tune's stop: the first SIGTERM / SIGINT stops gracefully, a second of either
        exits at once, and no signal is raised again afterwards (uvicorn re-raises it, which would kill the process
        with the signal's exit code)."""

        signals: list[int]

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            self.signals = []
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # Only flags, no lock: a second signal may interrupt the first handler.
            self.signals.append(sig)
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

        async def shutdown(self, sockets: Any = None) -> None:
            app.stop_reading()
            await super().shutdown(sockets)

    settings = uvicorn.Config(
        app,
        http=TimedH11,
        loop="asyncio",
        lifespan="off",
        log_config=None,
        access_log=False,  # ApiApp writes its own access line (escaped, no query string)
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=config.shutdown_grace + SEND_MARGIN,
    )
    server = Server(settings)
    server.signals = []
    return server


class Service:
    """The server for one backend: the scheduler, the application, uvicorn on the bound socket. `run()` serves
    until a signal (or `stop()` from another thread)."""

    def __init__(self, backend: Backend, config: ServeConfig, sock: socket.socket | None = None):
        self.backend, self.config = backend, config
        self.sock = sock or bind(config.host, config.port)
        self.url = address_of(self.sock)
        self.scheduler = Scheduler(backend, max_waiting=config.max_waiting, max_batch=config.max_batch)
        self.app = ApiApp(config, self.scheduler)
        self.server = _uvicorn_server(self.app, config)
        self.cut: list[int] = []

    def stop(self) -> None:
        """As a SIGTERM would (a second call: as a second signal)."""
        self.server.handle_exit(signal.SIGTERM, None)

    def _stopper(self) -> None:  # waits for the first signal, then gives the answers in flight their grace
        while not self.server.should_exit:
            time.sleep(0.05)
        signals = self.server.signals
        name = signal.Signals(signals[0]).name if signals else "stop"
        log.info("lora-tune serve: %s received; finishing the requests in flight", name)
        hurry = lambda: self.server.force_exit  # noqa: E731 - a second signal
        self.cut.append(self.scheduler.close(self.config.shutdown_grace, hurry=hurry, join=SEND_MARGIN))

    def run(self) -> int:
        """Serve until SIGTERM or Ctrl-C; then stop accepting, let answers in flight finish (or end them after the
        grace period) and return 0."""
        _route_uvicorn_log()
        closer = threading.Thread(target=self._stopper, name="lora-tune-stop", daemon=True)
        closer.start()
        print(
            f"lora-tune serve: {self.config.model_name} ({self.backend.description}) listening on {self.url}/v1 "
            f"({self.scheduler.parallel} at once)",
            flush=True,
        )
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.server.should_exit = True
            closer.join(
                timeout=SEND_MARGIN if self.server.force_exit else self.config.shutdown_grace + 2 * SEND_MARGIN
            )
            self.sock.close()
        cut = self.cut[0] if self.cut else len(self.scheduler.active)
        print(f"lora-tune serve: stopped{f' ({cut} answers cut short)' if cut else ''}", flush=True)
        return 0


def serve(backend: Backend, config: ServeConfig, sock: socket.socket | None = None) -> int:
    """Serve `backend` until SIGTERM or Ctrl-C (see Service). `sock`: the socket `bind` made (bound here
    otherwise)."""
    return Service(backend, config, sock).run()


def _route_uvicorn_log() -> None:
    """uvicorn's own warnings and errors (a malformed request, a task cancelled at the stop) through lora_tune's
    handlers, so they are masked like every other line; its info lines stay out."""
    ours = logging.getLogger("lora_tune")
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = list(ours.handlers)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
