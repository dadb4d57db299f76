"""The HTTP layer: routes, the API key, body limits, answers whole or streamed (SSE), and a clean stop.

The standard library's ThreadingHTTPServer: a thread per connection parses and writes, the Scheduler's one thread
generates. Every response closes its connection (no keep-alive), so a stop only waits for requests in flight, never
for idle clients.
"""

from __future__ import annotations

import hmac
import json
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lora_tune.serve.backend import Backend
from lora_tune.serve.protocol import ApiError, GenerationRequest, Limits, parse_chat, parse_completion, parse_json
from lora_tune.serve.responses import Reply, model_card, model_list, sse
from lora_tune.serve.worker import Failed, Finished, Job, Piece, Scheduler, Started

log = logging.getLogger("lora_tune.serve")

POST_ROUTES = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completion}
GET_ROUTES = {"/v1/models", "/health"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DISCARD_LIMIT = 16 << 20  # bytes of an oversized body read and dropped so that its sender gets the 413
SOCKET_TIMEOUT = 60.0  # seconds a client may take to send its request, so a silent one cannot hold a thread


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


class ApiServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads: in-flight answers are finished, not dropped
    block_on_close = True

    def __init__(self, config: ServeConfig, scheduler: Scheduler):
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.config, self.scheduler, self.created = config, scheduler, int(time.time())
        super().__init__((config.host, config.port), Handler)


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        self.close_connection = True
        self._headers_sent = False
        try:
            self._route(method, self.path.split("?", 1)[0].rstrip("/") or "/")
        except ApiError as error:
            self._send_json(error.status, error.body())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left; nothing to answer
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 and is logged; the server keeps serving
            log.exception("request failed")
            error = ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error", kind="server_error")
            if not self._headers_sent:
                self._send_json(500, error.body())

    def _route(self, method: str, path: str) -> None:
        if path == "/health" and method == "GET":
            self._send_json(200, {"status": "ok"})
            return
        known = path in POST_ROUTES or path in GET_ROUTES or path.startswith("/v1/models/")
        if not known:
            raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
        self._authorize()
        allowed = "POST" if path in POST_ROUTES else "GET"
        if method != allowed:
            self._allow = allowed
            raise ApiError(405, f"{path} takes {allowed}, not {method}", code="method_not_allowed")
        if path in POST_ROUTES:
            self._generate(POST_ROUTES[path](parse_json(self._body()), self.server.config.limits))
        elif path == "/v1/models":
            self._send_json(200, model_list(self.server.config.model_name, self.server.created))
        else:
            self._send_json(200, model_card(self._known_model(path.removeprefix("/v1/models/")), self.server.created))

    def _authorize(self) -> None:
        key = self.server.config.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        # compare_digest: the time taken says nothing about how much of the key was right. The key is never logged.
        if not hmac.compare_digest(token.encode(), key.encode()):
            what = "a wrong API key" if token else "no API key (send Authorization: Bearer KEY)"
            raise ApiError(401, f"{what}", code="invalid_api_key")

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise ApiError(411, "a request body needs a Content-Length header", code="length_required")
        limit = self.server.config.max_body_bytes
        if int(length) > limit:
            self._discard(int(length))
            raise ApiError(413, f"the request body is {int(length):,} bytes; at most {limit:,}", code="too_large")
        return self.rfile.read(int(length))

    def _discard(self, length: int) -> None:
        # A client still sending when the connection closes may see a reset instead of the 413: read a moderately
        # oversized body away first; a huge one is cut off (its sender gets the reset).
        left = length if length <= DISCARD_LIMIT else 0
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
            left -= len(chunk)

    def _known_model(self, name: str | None) -> str:
        served = self.server.config.model_name
        if name is not None and name != served:
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server has {served!r}",
                param="model",
                code="model_not_found",
            )
        return served

    def _generate(self, request: GenerationRequest) -> None:
        self._known_model(request.model)
        job = self.server.scheduler.submit(request)
        first = job.events.get()
        if isinstance(first, Failed):
            raise first.error
        assert isinstance(first, Started)
        reply = Reply(self.server.config.model_name, request.is_chat)
        try:
            if request.stream:
                self._stream(job, reply, request.include_usage)
            else:
                self._whole(job, reply)
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()  # the client left: stop generating for it

    def _whole(self, job: Job, reply: Reply) -> None:
        text = []
        while True:
            event = job.events.get()
            if isinstance(event, Piece):
                text.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Finished):
                self._send_json(200, reply.whole("".join(text), event.finish_reason, event.usage))
                return

    def _stream(self, job: Job, reply: Reply, include_usage: bool) -> None:
        self._headers_sent = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self._write(sse(reply.chunk(first=True)))
        while True:
            event = job.events.get()
            if isinstance(event, Piece):
                self._write(sse(reply.chunk(event.text)))
            elif isinstance(event, Failed):
                self._write(sse(event.error.body()))  # headers are gone: the error travels as an event
                return
            elif isinstance(event, Finished):
                self._write(sse(reply.chunk(finish_reason=event.finish_reason)))
                if include_usage:
                    self._write(sse(reply.usage_chunk(event.usage)))
                self._write(sse("[DONE]"))
                return

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self._headers_sent = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        if status == 405:
            self.send_header("Allow", getattr(self, "_allow", "GET"))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self._write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        # The request line and status only: headers (and so the API key) never reach the log.
        log.info("%s %s", self.address_string(), format % args)


def serve(backend: Backend, config: ServeConfig) -> int:
    """Serve until SIGTERM or Ctrl-C; then stop accepting, let answers in flight finish (or end them after the
    grace period) and return 0."""
    scheduler = Scheduler(backend, max_waiting=config.max_waiting)
    server = ApiServer(config, scheduler)
    received: list[int] = []
    # The handler only appends (atomic, no lock): a handler that takes a lock can deadlock when a second signal
    # interrupts the first while it holds it. The main thread watches the list and does the stopping.
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in STOP_SIGNALS}
    listener = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="lora-tune-http")
    listener.start()
    host, port = server.server_address[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"lora-tune serve: {config.model_name} ({backend.description}) listening on {url}/v1", flush=True)
    try:
        while not received and listener.is_alive():
            time.sleep(0.1)
        if received:
            name = signal.Signals(received[0]).name
            log.info("lora-tune serve: %s received; finishing the requests in flight", name)
    finally:
        server.shutdown()  # serve_forever returns; no new connections are taken from here on
        listener.join()
        server.socket.close()
        cut = scheduler.close(config.shutdown_grace, hurry=lambda: len(received) > 1)  # a second ^C
        server.server_close()  # joins the handler threads, which end with their jobs
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"lora-tune serve: stopped{f' ({cut} answers cut short)' if cut else ''}", flush=True)
    return 0
