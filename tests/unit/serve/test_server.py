"""The HTTP layer in-process (uvicorn on a thread), on a scripted backend: routes, auth, limits, the error shape,
whole and streamed answers, requests batched together, a disconnected client's request cancelled."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from lora_tune.serve.protocol import Limits
from lora_tune.serve.server import ServeConfig, Service

KEY = "test-key-1234567890"


@contextmanager
def running(backend: Any, **config: Any) -> Iterator[Service]:
    defaults = {"api_key": KEY, "model_name": "tiny", "limits": Limits(max_tokens=50), "shutdown_grace": 1}
    service = Service(backend, ServeConfig(port=0, max_body_bytes=2048, **{**defaults, **config}))
    service.port = service.sock.getsockname()[1]
    thread = threading.Thread(target=service.run)
    thread.start()
    try:
        yield service
    finally:
        service.stop()
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture
def server(scripted) -> Iterator[Service]:
    with running(scripted({"hello": "hi there, friend"})) as service:
        yield service


def call(
    api: Service, method: str, path: str, body: Any = None, *, key: str | None = KEY, raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=data, headers=headers)
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def error_of(status_and_body: tuple[int, dict[str, str], bytes]) -> tuple[int, dict[str, Any]]:
    status, _, body = status_and_body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return status, error


def chat(content: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **fields}


def test_a_whole_chat_answer(server: Service) -> None:
    status, headers, body = call(server, "POST", "/v1/chat/completions", chat())
    answer = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
    assert answer["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi there, friend"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 17, "total_tokens": 22}


def test_a_streamed_answer_is_sse_chunks_ending_with_done(server: Service) -> None:
    status, headers, body = call(
        server, "POST", "/v1/chat/completions", chat(stream=True, stop=",", stream_options={"include_usage": True})
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "hi there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_a_completion_and_the_model_list(server: Service) -> None:
    status, _, body = call(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 2})
    answer = json.loads(body)
    assert status == 200 and answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == "cb" and answer["choices"][0]["finish_reason"] == "length"
    status, _, body = call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["tiny"]
    status, _, body = call(server, "GET", "/v1/models/tiny")
    assert status == 200 and json.loads(body)["id"] == "tiny"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v1/nothing", None, 404, "not_found"),
        ("GET", "/v1/models/other", None, 404, "model_not_found"),
        ("POST", "/v1/chat/completions", chat(model="other"), 404, "model_not_found"),
        ("GET", "/v1/chat/completions", None, 405, "method_not_allowed"),
        ("DELETE", "/v1/models", None, 405, "method_not_allowed"),
        ("POST", "/v1/chat/completions", chat(temperature=9), 400, "invalid_value"),
        ("POST", "/v1/chat/completions", chat(max_tokens=51), 400, "invalid_value"),
        ("POST", "/v1/chat/completions", chat("x" * 3000), 413, "too_large"),
    ],
)
def test_bad_requests_get_the_openai_error_shape(
    server: Service, method: str, path: str, body: Any, status: int, code: str
) -> None:
    got, error = error_of(call(server, method, path, body))
    assert (got, error["code"], error["type"]) == (status, code, "invalid_request_error")


def test_bad_json_is_a_400(server: Service) -> None:
    status, error = error_of(call(server, "POST", "/v1/completions", raw=b'{"prompt": '))
    assert status == 400 and error["code"] == "invalid_json"


@pytest.mark.parametrize("key", [None, "wrong-key", KEY + "x"])
def test_a_missing_or_wrong_key_is_a_401(server: Service, key: str | None) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        status, error = error_of(call(server, method, path, chat(), key=key))
        assert status == 401 and error["code"] == "invalid_api_key"
        assert KEY not in error["message"]


def test_health_needs_no_key(server: Service) -> None:
    status, _, body = call(server, "GET", "/health", key=None)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_a_post_without_content_length_is_refused(server: Service) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and json.loads(response.read())["error"]["code"] == "length_required"


def test_requests_that_arrive_together_are_generated_together(scripted_batch) -> None:
    backend = scripted_batch(delay=0.01)
    prompts = [f"prompt number {i} " * 3 for i in range(6)]
    answers: dict[str, str] = {}
    with running(backend, limits=Limits(max_tokens=100)) as service:

        def ask(prompt: str) -> None:
            _, _, body = call(service, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 100})
            answers[prompt] = json.loads(body)["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert answers == {p: p[::-1] for p in prompts}  # each its own answer
    assert max(backend.steps) > 1  # and steps made tokens for several requests at once


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_its_request(scripted_batch, stream: bool) -> None:
    backend = scripted_batch(delay=0.01)
    with running(backend, limits=Limits(max_tokens=1000)) as service:
        body = json.dumps({"prompt": "z" * 900, "max_tokens": 1000, "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", service.port))
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        while backend.tokens_made < 5:
            time.sleep(0.01)
        sock.close()
        while service.scheduler.active:  # the request leaves the scheduler once cancelled
            time.sleep(0.01)
        made = backend.tokens_made
    assert made < 901  # not generated in full


def test_the_stop_cuts_an_answer_after_the_grace_with_an_error_event(scripted_batch) -> None:
    backend = scripted_batch(delay=0.01)
    with running(backend, limits=Limits(max_tokens=1000), shutdown_grace=0.2) as service:
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        body = json.dumps({"prompt": "w" * 900, "max_tokens": 1000, "stream": True})
        connection.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
        response = connection.getresponse()
        assert response.readline().startswith(b"data: ")
        service.stop()
        events = response.read().decode().split("\n\n")
    assert "shutting_down" in events[-2] and "[DONE]" not in events
