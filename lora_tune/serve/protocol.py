"""Requests as the OpenAI API spells them, checked field by field; a bad field becomes an `ApiError` (HTTP 4xx).

Only what the server honours is accepted: a field that would change the answer but is not implemented (n > 1,
tools, logprobs, penalties, echo, suffix) is refused with 400 rather than silently ignored. Fields that change
nothing here (user, metadata, ...) are ignored, as clients send them freely.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 4  # as the OpenAI API
MIN_TEMPERATURE = 1e-3  # the smallest temperature above 0 that samples
CHAT_ROLES = {"system", "user", "assistant"}
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for the system message


class ApiError(Exception):
    """A request the server refuses: the HTTP status and the OpenAI error object's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's flags)."""

    max_tokens: int = 1024  # the most tokens a request may ask to generate
    default_max_tokens: int = 64  # when the request names none: the run's eval.max_new_tokens, capped by max_tokens


@dataclass
class Sampling:
    """How to generate: temperature None = the run's own setting (its recipe's `eval:` section)."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """A checked request: chat `messages` or a completion `prompt` (exactly one), and how to answer it."""

    model: str | None
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, or an integer of more digits than Python converts
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested deeper than the parser's stack
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_chat(body: dict[str, Any], limits: Limits) -> GenerationRequest:
    """A `/v1/chat/completions` body."""
    _refuse_unsupported(body, ("tools", "functions", "logprobs", "top_logprobs", "response_format"))
    return GenerationRequest(messages=_messages(body.get("messages")), **_common(body, limits))


def parse_completion(body: dict[str, Any], limits: Limits) -> GenerationRequest:
    """A `/v1/completions` body."""
    _refuse_unsupported(body, ("logprobs", "echo", "suffix", "best_of"))
    return GenerationRequest(prompt=_prompt(body.get("prompt")), **_common(body, limits))


def _common(body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _field("model", "must be a string")
    if _integer(body, "n", 1, 1, default=1) != 1:
        raise _field("n", "only n=1 is supported")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, -2.0, 2.0) not in (None, 0.0):
            raise _field(name, "is not supported (only 0)")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _field("stream_options", "must be an object")
    include_usage = _boolean(options or {}, "include_usage", name="stream_options.include_usage")
    return {"model": model, "sampling": _sampling(body, limits), "stream": stream, "include_usage": include_usage}


def _sampling(body: dict[str, Any], limits: Limits) -> Sampling:
    # max_completion_tokens is the newer name for max_tokens in the chat API; either may come.
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 1, limits.max_tokens, default=limits.default_max_tokens)
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
        # Dividing the logits by a temperature this small overflows them (1e-40 is below float32's smallest
        # normal number): sampling at it would be greedy decoding, or fail.
        raise _field("temperature", f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}")
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        seed=_integer(body, "seed", -(2**63), 2**64 - 1),
        stop=_stop(body.get("stop")),
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _field("messages", "must be a non-empty list of {role, content} objects")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _field(where, "must be an object with role and content")
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None
        if role not in CHAT_ROLES:
            got = _shown(message.get("role"))
            raise _field(f"{where}.role", f"must be one of {sorted(CHAT_ROLES)}, got {got}")
        messages.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return messages


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        if all(isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
    raise _field(where, "must be a string or a list of text parts (images and audio are not supported)")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # the client may wrap a single prompt in a list
    if not isinstance(value, str) or not value:
        raise _field("prompt", "must be a non-empty string (one prompt per request; token ids are not supported)")
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _field("stop", "must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise _field("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    return list(stops)


def _refuse_unsupported(body: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name) not in (None, False, [], 0):
            raise _field(name, "is not supported by this server")


def _boolean(body: dict[str, Any], key: str, *, name: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _field(name or key, "must be true or false")
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _field(name, "must be a number")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise _field(name, f"must be in {bracket}{low:g}, {high:g}], got {_shown(value)}")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int, *, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field(name, "must be an integer")
    if value < low or value > high:
        raise _field(name, f"must be between {low} and {high}, got {_shown(value)}")
    return value


def _shown(value: Any, limit: int = 40) -> str:
    """A client's value in an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _field(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")
