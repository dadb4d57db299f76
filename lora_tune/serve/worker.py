"""Requests wait in a bounded queue; the model serves several at once; each request gets its own events.

The HTTP layer only parses, queues and writes; the model is used by the scheduler's generation thread(s) alone. How
requests share the model is the backend's: a backend with `open_batch` (transformers) generates every admitted
request in one batch that new requests join between steps (`Batch`: `step()` makes one token for each row); a
backend with `slots` (llama.cpp: one context per slot over the same weights) generates one request per slot, each
slot on its own thread. Either way every request has its own event sink, its own stop rules and its own seeded
sampler, so requests cannot mix, and a request whose client has left (`Job.cancelled`) stops at the next token.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from lora_tune.serve.backend import Backend
from lora_tune.serve.protocol import ApiError, GenerationRequest, Sampling
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
    """One request. The generation thread calls `emit` with its events (by default they go to `events`, a
    thread-safe queue; the HTTP layer passes a function that hands them to its event loop)."""

    request: GenerationRequest
    emit: Callable[[Event], None] | None = None
    events: queue.Queue[Event] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client left, or the server stops

    def put(self, event: Event) -> None:
        (self.emit or self.events.put)(event)


class QueueFull(ApiError):
    def __init__(self, size: int):
        super().__init__(
            503, f"the server is busy ({size} requests waiting); retry later", code="overloaded", kind="server_error"
        )


class Row:
    """One request being generated: turns each new token into text pieces cut at stop strings, and knows when the
    answer is over (end of turn, a stop string, max_tokens, the client gone)."""

    def __init__(self, backend: Backend, job: Job):
        self.backend, self.job = backend, job
        request = job.request
        if job.cancelled.is_set():
            raise _cut_short()
        self.prompt = (
            backend.chat_prompt(request.messages)
            if request.messages is not None
            else backend.text_prompt(request.prompt or "")
        )
        param = "messages" if request.is_chat else "prompt"
        self.max_tokens = _room(backend, len(self.prompt), request.sampling.max_tokens, param)
        self.sampling: Sampling = replace(request.sampling, max_tokens=self.max_tokens)
        self.cutter = StopCutter(list(request.sampling.stop))
        self.generated: list[int] = []
        self.made, self.ended, self.done = 0, False, False
        job.put(Started(len(self.prompt)))

    def take(self, token: int) -> bool:
        """A new token; False when the answer is over (or its client gone): generate no more for it."""
        self.made += 1
        if self.backend.is_end(token):
            self.ended = True
            return False
        self.generated.append(token)
        if piece := self.cutter.feed(self.backend.decode(self.generated)):
            self.job.put(Piece(piece))
        return not self.cutter.stopped and not self.job.cancelled.is_set() and self.made < self.max_tokens

    def finish(self) -> None:
        """Generation for this row is over: the last piece and the finish reason, or `shutting_down` when the
        answer was cut (the client left or the server stops) before it ended on its own."""
        if self.done:
            return
        self.done = True
        complete = self.ended or self.cutter.stopped or self.made >= self.max_tokens
        if self.job.cancelled.is_set() and not complete:
            self.job.put(Failed(_cut_short()))
            return
        if piece := self.cutter.finish(self.backend.decode(self.generated)):
            self.job.put(Piece(piece))
        reason = "stop" if self.ended or self.cutter.stopped else "length"
        self.job.put(Finished(reason, Usage(len(self.prompt), self.made)))

    def fail(self, exc: BaseException) -> None:
        self.done = True
        _fail(self.job, exc)


class Batch(Protocol):
    """A batch of rows a backend generates together (see TransformersBackend.open_batch)."""

    def add(self, rows: list[Row]) -> None:
        """Start the rows (their prompts read in one pass) and give each its first token."""

    def step(self) -> None:
        """One more token for every row; rows whose answer is over leave the batch."""

    def __len__(self) -> int: ...


def run_job(backend: Backend, job: Job) -> None:
    """Generate one request's answer alone, putting Started, Pieces and Finished (or Failed) on its events."""
    try:
        row = Row(backend, job)
    except Exception as exc:  # noqa: BLE001 - one request failing must not take the server down
        _fail(job, exc)
        return
    try:
        backend.generate(row.prompt, row.sampling, row.take)
    except Exception as exc:  # noqa: BLE001
        row.fail(exc)
        return
    row.finish()


class Scheduler:
    """The request queue and the generation thread(s): one batch loop, or one thread per llama.cpp slot."""

    def __init__(self, backend: Backend, max_waiting: int = 64, max_batch: int = 16):
        self.backend = backend
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_waiting)
        self.active: set[Job] = set()  # queued or generating
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.closing = False
        self.max_batch = max(1, max_batch)
        self.batched = hasattr(backend, "open_batch") and getattr(backend, "batchable", True) and self.max_batch > 1
        if self.batched:
            targets = [self._batch_loop]
        else:
            targets = [lambda b=b: self._slot_loop(b) for b in getattr(backend, "slots", [backend])]
        self.threads = [
            threading.Thread(target=t, name=f"lora-tune-generate-{i}", daemon=True) for i, t in enumerate(targets)
        ]
        for thread in self.threads:
            thread.start()

    @property
    def parallel(self) -> int:
        """How many requests are generated at once."""
        return self.max_batch if self.batched else len(self.threads)

    def submit(self, request: GenerationRequest, emit: Callable[[Event], None] | None = None) -> Job:
        job = Job(request, emit)
        with self.lock:
            if self.closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            try:
                self.jobs.put_nowait(job)
            except queue.Full:
                raise QueueFull(self.jobs.maxsize) from None
            self.active.add(job)
        return job

    def close(self, grace: float, hurry: Callable[[], bool] = lambda: False, join: float | None = None) -> int:
        """Take no more jobs; let those queued or running finish within `grace` seconds (or until `hurry()` says
        so, e.g. at a second Ctrl-C), then end the rest, each with a `shutting_down` error. Returns how many were
        ended early. `join`: seconds to wait for the generation threads after that (None: until they end)."""
        deadline = time.monotonic() + grace
        with self.lock:
            self.closing = True
            while self.active and time.monotonic() < deadline and not hurry():
                self.idle.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            cut = list(self.active)
        for job in cut:
            job.cancelled.set()
        for _ in self.threads:
            self.jobs.put(None)  # after every job: the workers end them (cancelled ones at once), then exit
        ends = time.monotonic() + join if join is not None else None
        for thread in self.threads:
            thread.join(None if ends is None else max(0.0, ends - time.monotonic()))
        return len(cut)

    def _done(self, job: Job) -> None:
        with self.lock:
            self.active.discard(job)
            self.idle.notify_all()

    def _slot_loop(self, backend: Backend) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                run_job(backend, job)
            finally:
                self._done(job)

    def _batch_loop(self) -> None:
        batch: Batch = self.backend.open_batch()  # type: ignore[attr-defined]
        rows: list[Row] = []
        stopping = False
        while not (stopping and not rows):
            # Wait for work only when there is none; otherwise take whatever is waiting, up to the batch size.
            arrived: list[Job] = []
            while len(rows) + len(arrived) < self.max_batch:
                try:
                    job = self.jobs.get(block=not rows and not arrived and not stopping, timeout=None)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                arrived.append(job)
            fresh = self._start_rows(arrived)
            try:
                if fresh:
                    batch.add(fresh)
                    rows.extend(fresh)
                elif rows:
                    batch.step()
            except Exception as exc:  # noqa: BLE001 - the batch failed: its requests fail, the server goes on
                log.exception("generation failed")
                for row in {*rows, *fresh}:
                    row.fail(exc)
                rows = list({*rows, *fresh})
                batch = self.backend.open_batch()  # type: ignore[attr-defined]
            for row in [r for r in rows if r.done]:
                rows.remove(row)
                self._done(row.job)

    def _start_rows(self, jobs: list[Job]) -> list[Row]:
        rows = []
        for job in jobs:
            try:
                rows.append(Row(self.backend, job))
            except Exception as exc:  # noqa: BLE001 - a template refusal, a prompt over the context
                _fail(job, exc)
                self._done(job)
        return rows


def _fail(job: Job, exc: BaseException) -> None:
    if isinstance(exc, ApiError):
        job.put(Failed(exc))
        return
    log.error("generation failed", exc_info=exc)
    job.put(Failed(ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error")))


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
