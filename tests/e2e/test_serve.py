"""`lora-tune serve` end to end: a tiny trained run served in a subprocess, called with the official openai client.

One server per module (an adapter run, unmerged, behind an API key); a merged folder is served once more. Greedy
answers are compared with `lora-tune generate`'s (the same template and stop tokens) and with each other (alone vs
four at once, whole vs streamed); the last test stops the shared server with SIGTERM mid-answer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from lora_tune.cli import main
from tests.conftest import fruit_rows, write_jsonl
from tests.helpers import require_llama_cpp, tiny_llama_with_real_vocab

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-serve-test-0123456789abcdefghij"
STARTUP_SECONDS = 120

RECIPE = """\
model:
  name: {model}
  dtype: float32
adapter:
  r: 4
  alpha: 8
  dropout: 0.0
datasets:
  - path: {data}
training:
  learning_rate: 1.0e-3  # barely trained: answers stay long and varied (a well-fit tiny model ends its turn at once)
  max_steps: 2
  batch_size: 8
  max_length: 64
  warmup_steps: 0
  logging_steps: 1
  save_strategy: "no"
  gradient_checkpointing: false
eval:
  max_new_tokens: 24
output_dir: {out}
"""


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)  # everything it printed, stdout and stderr

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)


def start_server(path: Path, *extra: str, env: dict[str, str] | None = None) -> Server:
    """`lora-tune serve PATH --port 0` in a subprocess; returns once it prints the URL it listens on."""
    command = [sys.executable, "-m", "lora_tune", "serve", str(path), "--port", "0", *extra]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:  # drains the pipe for the server's whole life, so its log can never block it
        for line in process.stdout:
            lines.append(line)
            if "listening on" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not found.wait(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the server did not start:\n" + "".join(lines))
    url = re.search(r"listening on (http://\S+)", "".join(lines)).group(1)
    return Server(process, url, lines)


def stop_server(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=60)


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    data = write_jsonl(root / "train.jsonl", fruit_rows(40, "messages"))
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, data=data, out=root / "run"))
    assert main(["train", str(recipe)]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def server(run: Path) -> Iterator[Server]:
    server = start_server(run, env={"LORA_TUNE_API_KEY": KEY})
    yield server
    stop_server(server)


def ask(client: openai.OpenAI, question: str, **fields) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": question}]
    return client.chat.completions.create(model="run", messages=messages, **fields)


def test_a_chat_answer_is_what_lora_tune_generate_answers(server: Server, run: Path) -> None:
    from lora_tune.inference.chat import reply
    from lora_tune.inference.load import load_for_inference

    answer = ask(server.client(), "fruit number 3?", temperature=0)
    loaded = load_for_inference(run)
    expected = reply(loaded, [{"role": "user", "content": "fruit number 3?"}])
    text = answer.choices[0].message.content
    assert text.strip() == expected and expected  # generate() strips the answer; the API gives it as generated
    assert answer.model == "run" and answer.choices[0].finish_reason in ("stop", "length")
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "fruit number 3?"}], add_generation_prompt=True, tokenize=False
    )
    assert answer.usage.prompt_tokens == len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 0 < answer.usage.completion_tokens <= 24  # the run's eval.max_new_tokens is the default
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_a_streamed_answer_is_the_whole_answer_in_pieces(server: Server) -> None:
    client = server.client()
    whole = ask(client, "fruit number 5?", temperature=0, max_tokens=16)
    chunks = list(ask(client, "fruit number 5?", temperature=0, max_tokens=16, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 3 and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_stop_string_cuts_the_answer_before_it(server: Server) -> None:
    client = server.client()
    full = ask(client, "fruit number 1?", temperature=0, max_tokens=24).choices[0].message.content
    stop = next(full[i : i + 2] for i in range(1, len(full) - 1) if full[i : i + 2].isprintable())
    cut = ask(client, "fruit number 1?", temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = ask(client, "fruit number 1?", temperature=0, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]


def test_max_tokens_ends_with_length(server: Server) -> None:
    answer = ask(server.client(), "fruit number 2?", temperature=0, max_tokens=2)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 2


def test_the_same_seed_samples_the_same_answer(server: Server) -> None:
    client = server.client()
    sample = [
        ask(client, "fruit number 4?", temperature=1.5, max_tokens=16, seed=seed).choices[0].message.content
        for seed in (7, 7, 8, 9)
    ]
    assert sample[0] == sample[1]
    assert len(set(sample)) > 1  # and the seed matters (16 tokens at temperature 1.5 on a barely trained model)


def test_concurrent_requests_get_the_answers_they_get_alone(server: Server) -> None:
    client = server.client()
    questions = [f"fruit number {i}?" for i in (0, 6, 7, 8)]
    alone = {q: ask(client, q, temperature=0, max_tokens=12).choices[0].message.content for q in questions}
    together: dict[str, str] = {}

    def ask_in_thread(question: str) -> None:
        together[question] = ask(client, question, temperature=0, max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=ask_in_thread, args=(q,)) for q in questions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone
    assert len(set(alone.values())) > 1  # distinct prompts, distinct answers: a mix-up would show


def test_completions_and_the_model_list(server: Server) -> None:
    client = server.client()
    completion = client.completions.create(model="run", prompt="name a fruit:", max_tokens=5, temperature=0)
    assert completion.choices[0].text and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 5
    assert [m.id for m in client.models.list()] == ["run"]


def test_bad_requests_get_openai_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "hi", temperature=5)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "temperature"
    assert caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        ask(client, "hi", max_tokens=10**6)
    status, body = raw_post(server.url + "/chat/completions", b"x" * (2 << 20))
    assert status == 413 and body["error"]["code"] == "too_large"
    status, body = raw_post(server.url + "/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def raw_post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {KEY}"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_api_key_is_required_and_never_printed(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client("sk-wrong").models.list()
    assert caught.value.status_code == 401
    assert "invalid_api_key" in str(caught.value.body)
    assert KEY not in "".join(server.lines)


def test_a_merged_folder_serves_the_same_answers(server: Server, run: Path, tmp_path: Path) -> None:
    assert main(["merge", str(run), "--output", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = start_server(tmp_path / "merged", "--model-name", "merged")
    try:
        answer = merged.client("unused").chat.completions.create(
            model="merged", messages=[{"role": "user", "content": "fruit number 3?"}], temperature=0, max_tokens=8
        )
    finally:
        assert stop_server(merged) == 0
    assert (
        answer.choices[0].message.content
        == ask(server.client(), "fruit number 3?", temperature=0, max_tokens=8).choices[0].message.content
    )


def test_sigterm_lets_the_answer_in_flight_finish_and_exits_0(server: Server) -> None:
    """Last in the module: it stops the shared server."""
    stream = ask(server.client(), "fruit number 8?", temperature=0, max_tokens=200, stream=True)
    first = next(iter(stream))
    server.process.send_signal(signal.SIGTERM)
    rest = list(stream)  # the stream goes on to its end after the signal
    assert first.choices[0].delta.role == "assistant"
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
    assert server.process.wait(timeout=60) == 0
    with pytest.raises(openai.APIConnectionError):
        server.client().models.list()
    assert "SIGTERM received" in "".join(server.lines) and "stopped" in server.lines[-1]


# A .gguf file through llama.cpp: a tiny Llama with the real Llama 3 vocabulary and chat template (cached by
# scripts/real_material.py), exported by `lora-tune export --format gguf`.


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the model folder, its f16 .gguf)."""
    require_llama_cpp()
    root = tmp_path_factory.mktemp("serve-gguf")
    folder = tiny_llama_with_real_vocab(root / "tiny-llama3")
    assert main(["export", str(folder), "--format", "gguf", "--quant", "f16", "--output", str(root / "gguf")]) == 0
    [gguf] = (root / "gguf").glob("*.gguf")
    return folder, gguf


def test_a_gguf_file_answers_as_transformers_does_through_its_own_chat_template(gguf_model: tuple[Path, Path]):
    from lora_tune.inference.chat import reply, with_settings
    from lora_tune.inference.load import load_for_inference

    folder, gguf = gguf_model
    server = start_server(gguf)
    try:
        client = server.client("unused")
        assert [m.id for m in client.models.list()] == [gguf.stem]
        question = [{"role": "user", "content": "Name a fruit like apple or pear."}]
        answer = client.chat.completions.create(model=gguf.stem, messages=question, temperature=0, max_tokens=12)
        streamed = client.chat.completions.create(
            model=gguf.stem, messages=question, temperature=0, max_tokens=12, stream=True
        )
        pieces = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        sampled = [
            client.chat.completions.create(
                model=gguf.stem, messages=question, temperature=1.0, max_tokens=8, seed=seed
            )
            .choices[0]
            .message.content
            for seed in (5, 5, 6)
        ]
    finally:
        assert stop_server(server) == 0
    loaded = with_settings(load_for_inference(folder), {"max_new_tokens": 12})
    text = answer.choices[0].message.content
    assert text.strip() == reply(loaded, question) and pieces == text
    prompt = loaded.tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert answer.usage.prompt_tokens == len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert sampled[0] == sampled[1] != sampled[2]
    assert "GGUF, llama.cpp" in "".join(server.lines)
