"""A scripted backend for the server's unit tests: characters are tokens, and each prompt has a known answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

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
        text = self.decode(prompt)
        self.calls.append((text, sampling))
        answer = self.answers.get(text, text[::-1])
        self.generating.set()
        try:
            for count, token in enumerate([*map(ord, answer), END], start=1):
                time.sleep(self.delay)
                if not on_token(token) or count >= sampling.max_tokens:
                    return
        finally:
            self.generating.clear()


@pytest.fixture
def scripted() -> type[ScriptedBackend]:
    return ScriptedBackend
