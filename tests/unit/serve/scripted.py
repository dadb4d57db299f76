"""A scripted backend for the server's tests: characters are tokens, and each prompt has a known answer.

`python -m tests.unit.serve.scripted --port 0 ...` serves it in a process of its own through the real `serve()`,
for the tests that send signals and hold sockets open.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any

from lora_tune.recipe.schema import EvalConfig
from lora_tune.serve.protocol import ApiError, Sampling

END = 0  # the end-of-turn token


class ScriptedBackend:
    """Answers `answers[prompt]` (or the prompt reversed) one character per token, then END; `delay` per token."""

    description = "scripted test backend"
    defaults = EvalConfig()

    def __init__(self, answers: dict[str, str] | None = None, delay: float = 0.0, context_length: int | None = 4096):
        self.answers, self.delay, self.context_length = answers or {}, delay, context_length
        self.generating = threading.Event()  # set while a generation runs
        self.calls: list[tuple[str, Sampling]] = []
        self.tokens_made = 0  # across every request: how much work was done

    def answer(self, prompt: list[int]) -> list[int]:
        text = self.decode(prompt)
        return [*map(ord, self.answers.get(text, text[::-1])), END]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if messages[0]["role"] == "assistant":
            raise ApiError(400, "messages: the chat template refused them: first turn", param="messages")
        return self.text_prompt(messages[-1]["content"])

    def text_prompt(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, tokens: list[int]) -> str:
        return "".join(chr(t) for t in tokens)

    def is_end(self, token: int) -> bool:
        return token == END

    def generate(self, prompt: list[int], sampling: Sampling, on_token: Callable[[int], bool]) -> None:
        self.calls.append((self.decode(prompt), sampling))
        self.generating.set()
        try:
            for count, token in enumerate(self.answer(prompt), start=1):
                time.sleep(self.delay)
                self.tokens_made += 1
                if not on_token(token) or count >= sampling.max_tokens:
                    return
        finally:
            self.generating.clear()


class ScriptedBatchBackend(ScriptedBackend):
    """The same answers, generated as a batch (one token for every row per step), as the transformers backend
    does; `steps` records the rows of each step."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []

    def open_batch(self) -> Any:
        return _ScriptedBatch(self)


class _ScriptedBatch:
    def __init__(self, backend: ScriptedBatchBackend):
        self.backend, self.rows, self.answers = backend, [], []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Any]) -> None:
        for row in rows:
            self.backend.calls.append((self.backend.decode(row.prompt), row.sampling))
            self.rows.append(row)
            self.answers.append(iter(self.backend.answer(row.prompt)))
        self._next(rows)

    def step(self) -> None:
        self.backend.steps.append(len(self.rows))
        time.sleep(self.backend.delay)
        self._next(list(self.rows))

    def _next(self, rows: list[Any]) -> None:
        for row in rows:
            i = self.rows.index(row)
            if row.job.cancelled.is_set():
                row.finish()
                continue
            self.backend.tokens_made += 1
            if not row.take(next(self.answers[i])):
                row.finish()
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        self.rows = [self.rows[i] for i in keep]
        self.answers = [self.answers[i] for i in keep]


def main() -> None:
    from lora_tune.cli import _configure_logging
    from lora_tune.serve.protocol import Limits
    from lora_tune.serve.server import ServeConfig, serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    import sys

    _configure_logging(False, sys.stdout)
    config = ServeConfig(
        port=args.port,
        api_key=args.api_key,
        model_name="tiny",
        limits=Limits(max_tokens=1000),
        shutdown_grace=args.grace,
    )
    backend = ScriptedBatchBackend(delay=args.delay)

    def report() -> None:  # the work done so far, for the tests to read from the log
        shown = -1
        while True:
            if backend.tokens_made != shown:
                shown = backend.tokens_made
                print(f"scripted: tokens made {shown}", flush=True)
            time.sleep(0.1)

    threading.Thread(target=report, daemon=True).start()
    raise SystemExit(serve(backend, config))


if __name__ == "__main__":
    main()
