"""The transformers backend's batch: rows that join between steps, leave when done, and each get the tokens
`generate()` gives their prompt alone (greedy), or the same sampled text for the same seed whatever the batch."""

from __future__ import annotations

import random

import pytest

from lora_tune.serve.protocol import GenerationRequest, Sampling
from lora_tune.serve.worker import Finished, Job, Piece, Row


@pytest.fixture(scope="module")
def backend():
    import torch

    from lora_tune.inference.load import LoadedModel
    from lora_tune.quickstart.tiny import build_tiny_llama, build_tokenizer
    from lora_tune.recipe.schema import EvalConfig
    from lora_tune.serve.hf_backend import TransformersBackend

    torch.manual_seed(0)
    rng = random.Random(0)
    words = ["apple", "pear", "sky", "blue", "one", "two", "three", "fox", "dog", "the", "is", "a", "of"]
    tokenizer = build_tokenizer([" ".join(rng.choices(words, k=12)) for _ in range(100)], vocab_size=300)
    model = build_tiny_llama(tokenizer, hidden_size=64, num_layers=2, num_heads=4).eval()
    return TransformersBackend(LoadedModel(model, tokenizer, EvalConfig(stop_on_eos=False), "tiny"))


def row(backend, prompt: str, max_tokens: int, **sampling) -> Row:
    return Row(backend, Job(GenerationRequest(None, Sampling(max_tokens=max_tokens, **sampling), prompt=prompt)))


def text_of(r: Row) -> str:
    events = []
    while not r.job.events.empty():
        events.append(r.job.events.get())
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, Piece))


def alone(backend, prompt: str, max_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([backend.text_prompt(prompt)])
    out = backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_rows_that_join_and_leave_get_the_tokens_they_get_alone(backend) -> None:
    prompts = [("the sky is", 9), ("one two three four five fox", 4), ("a", 12), ("dog of the blue pear", 7)]
    batch = backend.open_batch()
    rows = [row(backend, p, n) for p, n in prompts]
    batch.add(rows[:1])
    batch.step()
    batch.add(rows[1:3])  # join a batch already two tokens in, with longer and shorter prompts
    for _ in range(3):
        batch.step()
    batch.add(rows[3:])  # after a row has left
    while len(batch):
        batch.step()
    for r, (prompt, n) in zip(rows, prompts, strict=True):
        assert r.generated == alone(backend, prompt, n), prompt
        assert r.made == n and text_of(r) == backend.decode(r.generated)


def test_a_seed_samples_the_same_text_whatever_else_is_in_the_batch(backend) -> None:
    def sampled(company: int) -> list[int]:
        batch = backend.open_batch()
        mine = row(backend, "the fox is", 10, temperature=1.5, seed=7)
        batch.add([mine, *[row(backend, "two" * (i + 1), 10, temperature=1.0) for i in range(company)]])
        while len(batch):
            batch.step()
        return mine.generated

    assert sampled(0) == sampled(3)


def test_a_cancelled_row_leaves_at_the_next_step(backend) -> None:
    batch = backend.open_batch()
    staying, leaving = row(backend, "the sky", 6), row(backend, "blue", 50)
    batch.add([staying, leaving])
    leaving.job.cancelled.set()
    batch.step()
    assert len(batch) == 1 and leaving.done and leaving.made == 1
    while len(batch):
        batch.step()
    assert staying.generated == alone(backend, "the sky", 6)
