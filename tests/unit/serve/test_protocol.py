"""Request checks: what is accepted and how, and the 4xx error (status, param, code) of each bad field."""

from __future__ import annotations

from typing import Any

import pytest

from lora_tune.serve.protocol import ApiError, Limits, parse_chat, parse_completion, parse_json

LIMITS = Limits(max_tokens=100, default_max_tokens=16)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_chat_request_with_every_supported_field() -> None:
    body = {
        **CHAT,
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]},
        ],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": "###",
        "seed": 42,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "ignored",
    }
    request = parse_chat(body, LIMITS)
    assert request.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two parts"}]
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.max_tokens) == (0.7, 0.9, 50)
    assert request.sampling.stop == ["###"] and request.sampling.seed == 42
    assert request.stream and request.include_usage and request.is_chat and request.model == "m"


def test_defaults_leave_decoding_to_the_model_and_take_the_servers_max_tokens() -> None:
    request = parse_chat(CHAT, LIMITS)
    assert request.sampling.max_tokens == 16
    assert request.sampling.temperature is None and request.sampling.top_p is None and request.sampling.seed is None
    assert request.sampling.stop == [] and not request.stream
    assert parse_chat({**CHAT, "max_completion_tokens": 7}, LIMITS).sampling.max_tokens == 7


def test_a_completion_request() -> None:
    request = parse_completion({"model": "m", "prompt": ["once upon"], "stop": ["a", "b"]}, LIMITS)
    assert request.prompt == "once upon" and not request.is_chat and request.sampling.stop == ["a", "b"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
            "messages[0].content",
        ),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 101}, "max_tokens"),
        ({"max_tokens": 5.5}, "max_tokens"),
        ({"seed": "7"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"model": 5}, "model"),
    ],
)
def test_each_bad_chat_field_is_a_400_naming_the_field(change: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_chat({**CHAT, **change}, LIMITS)
    error = caught.value
    assert error.status == 400 and error.param == param and error.message.startswith(param)
    assert error.body() == {
        "error": {"message": error.message, "type": "invalid_request_error", "param": param, "code": "invalid_value"}
    }


@pytest.mark.parametrize("prompt", [None, "", ["a", "b"], [1, 2, 3]])
def test_a_completion_needs_one_text_prompt(prompt: Any) -> None:
    with pytest.raises(ApiError, match="prompt") as caught:
        parse_completion({"model": "m", "prompt": prompt}, LIMITS)
    assert caught.value.param == "prompt"


def test_echo_and_suffix_are_refused_not_ignored() -> None:
    for field in ("echo", "suffix"):
        with pytest.raises(ApiError, match="not supported"):
            parse_completion({"prompt": "x", field: True if field == "echo" else "end"}, LIMITS)


@pytest.mark.parametrize("raw", [b"{bad", b"[1, 2]", b"\xff\xfe", b""])
def test_a_body_that_is_not_a_json_object_is_a_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_json(raw)
    assert caught.value.status == 400 and caught.value.code == "invalid_json"
