"""One generation at a time: requests wait in a queue, one worker thread generates, each request gets its own events.

The handler threads (one per connection) only parse, queue and write; the model is used by the worker alone. That
keeps requests from mixing (each job has its own event queue, and a seed applies to its job only) at the price of
no batching: a request waits for the ones ahead of it. On a CPU, where one generation already uses every core,
batching would gain little.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from lora_tune.serve.backend import Backend
from lora_tune.serve.protocol import ApiError, GenerationRequest
from lora_tune.serve.responses import Usage
from lora_tune.serve.stops import StopCutter

log = logging.getLogger("lora_tune.serve")


@dataclass
class Started:
    prompt_tokens: int


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    usage: Usage


@dataclass
class Failed:
    error: ApiError


Event = Started | Piece | Finished | Failed


@dataclass(eq=False)  # identity: a job is one request, kept in a set while active
class Job:
    request: GenerationRequest
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client left, or the server stops


class QueueFull(ApiError):
    def __init__(self, size: int):
        super().__init__(
            503, f"the server is busy ({size} requests waiting); retry later", code="overloaded", kind="server_error"
        )


class Scheduler:
    """The request queue and its single generation thread."""

    def __init__(self, backend: Backend, max_waiting: int = 64):
        self.backend = backend
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_waiting)
        self.active: set[Job] = set()  # queued or generating
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="lora-tune-generate", daemon=True)
        self.thread.start()

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request)
        with self.lock:
            if self.closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            try:
                self.jobs.put_nowait(job)
            except queue.Full:
                raise QueueFull(self.jobs.maxsize) from None
            self.active.add(job)
        return job

    def close(self, grace: float, hurry: Callable[[], bool] = lambda: False) -> int:
        """Take no more jobs; let those queued or running finish within `grace` seconds (or until `hurry()` says
        so, e.g. at a second Ctrl-C), then end the rest. Returns how many were ended early."""
        deadline = time.monotonic() + grace
        with self.lock:
            self.closing = True
            while self.active and time.monotonic() < deadline and not hurry():
                self.idle.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            cut = list(self.active)
        for job in cut:
            job.cancelled.set()
        self.jobs.put(None)  # after every job: the worker ends them (cancelled ones at once), then exits
        self.thread.join()
        return len(cut)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                run_job(self.backend, job)
            finally:
                with self.lock:
                    self.active.discard(job)
                    self.idle.notify_all()


def run_job(backend: Backend, job: Job) -> None:
    """Generate one request's answer, putting Started, Pieces and Finished (or Failed) on its event queue."""
    try:
        _generate(backend, job)
    except ApiError as error:
        job.events.put(Failed(error))
    except Exception as exc:  # noqa: BLE001 - one request failing must not take the server down
        log.exception("generation failed")
        job.events.put(Failed(ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")))


def _generate(backend: Backend, job: Job) -> None:
    request = job.request
    if job.cancelled.is_set():
        raise _cut_short()
    prompt = (
        backend.chat_prompt(request.messages)
        if request.messages is not None
        else backend.text_prompt(request.prompt or "")
    )
    max_tokens = _room(backend, len(prompt), request.sampling.max_tokens, "messages" if request.is_chat else "prompt")
    job.events.put(Started(len(prompt)))
    cutter = StopCutter(list(request.sampling.stop))
    generated: list[int] = []
    made, ended = 0, False

    def on_token(token: int) -> bool:
        nonlocal made, ended
        made += 1
        if backend.is_end(token):
            ended = True
            return False
        generated.append(token)
        if piece := cutter.feed(backend.decode(generated)):
            job.events.put(Piece(piece))
        return not cutter.stopped and not job.cancelled.is_set() and made < max_tokens

    backend.generate(prompt, replace(request.sampling, max_tokens=max_tokens), on_token)
    if job.cancelled.is_set() and not (ended or cutter.stopped or made >= max_tokens):
        raise _cut_short()
    if piece := cutter.finish(backend.decode(generated)):
        job.events.put(Piece(piece))
    reason = "stop" if ended or cutter.stopped else "length"
    job.events.put(Finished(reason, Usage(len(prompt), made)))


def _room(backend: Backend, prompt_tokens: int, max_tokens: int, param: str) -> int:
    """Tokens the answer may have: the request's max_tokens, or less where the context ends first."""
    if backend.context_length is None:
        return max_tokens
    room = backend.context_length - prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"{param}: the prompt is {prompt_tokens} tokens; the model's context holds {backend.context_length}",
            param=param,
            code="context_length_exceeded",
        )
    return min(max_tokens, room)


def _cut_short() -> ApiError:
    return ApiError(
        503, "the server is shutting down; this answer was cut short", code="shutting_down", kind="server_error"
    )
