"""Shared fixtures: offline hub, a tiny locally built model and tokenizer, small SFT files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the colour of the sky? the sky is blue.",
    "name a fruit: apple, banana, cherry, grape, lemon, mango, orange, pear, plum",
    "count: one two three four five six seven eight nine ten",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear", "plum"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-64 Llama with a byte-level BPE tokenizer, saved as a standard HF folder."""
    from lora_tune.quickstart.tiny import build_tiny_llama, build_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(CORPUS * 20, vocab_size=320)
    model = build_tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=4)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fruit_rows(n: int, form: str = "alpaca") -> list[dict]:
    """A tiny instruction set: the answer depends on the input (index -> fruit)."""
    rows = []
    for i in range(n):
        question, answer = f"fruit number {i % len(FRUITS)}?", FRUITS[i % len(FRUITS)]
        if form == "alpaca":
            rows.append({"instruction": "Name the fruit.", "input": question, "output": answer})
        else:
            rows.append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            )
    return rows


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", fruit_rows(40, "alpaca"))


@pytest.fixture
def messages_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "messages.jsonl", fruit_rows(40, "messages"))
