"""What generation stops on: the template's end of turn, EOS, the generation config's ids and the trained tokens, put
together in one order; read from a folder's configs and a run's pre-flight report; on each real chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tune.model.stops import (
    config_stops,
    end_of_turn_id,
    generation_stops,
    read_generation_stops,
    trained_stops,
)
from lora_tune.recipe.templates import BUILTIN_TEMPLATES
from lora_tune.run.layout import PREFLIGHT_FILE, RunDir
from tests.helpers import model_dir, real_tokenizer_dir


@pytest.fixture
def tokenizer(tiny_model_dir: Path):  # noqa: ANN201 - a transformers tokenizer
    """The tiny tokenizer: its template closes each answer with <|end|>, which is also its EOS."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def ids(tokenizer, *tokens: str) -> list[int]:  # noqa: ANN001
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_end_of_turn_is_the_special_token_after_the_answer(tokenizer) -> None:
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"].source
    if "<|im_end|>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    assert end_of_turn_id(tokenizer) is None  # plain text after the answer
    tokenizer.chat_template = None
    assert end_of_turn_id(tokenizer) is None  # no template at all


def test_the_end_of_turn_comes_first_then_eos_the_configured_and_the_trained_ids_each_once(tokenizer) -> None:
    tokenizer.eos_token = "<|system|>"  # a base's own EOS, not what the template writes after an answer
    end, eos, user, assistant = ids(tokenizer, "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
    assert generation_stops(tokenizer, None) == [end, eos]
    assert generation_stops(tokenizer, eos) == [end, eos]
    assert generation_stops(tokenizer, [user, eos], ["<|assistant|>", "<|end|>"]) == [end, eos, user, assistant]
    assert generation_stops(tokenizer, [], ["no-such-token"]) == [end, eos]  # an unknown trained text is left out


def test_without_a_template_generation_stops_on_eos_and_the_configured_ids(tokenizer) -> None:
    tokenizer.chat_template = None
    eos, user = ids(tokenizer, "<|end|>", "<|user|>")
    assert generation_stops(tokenizer, [user]) == [eos, user]


def test_the_config_alone_stops_on_its_ids_else_on_eos(tokenizer) -> None:
    assert config_stops(tokenizer, [7, 9]) == [7, 9]
    assert config_stops(tokenizer, None) == [tokenizer.eos_token_id]  # no config could be read
    assert config_stops(tokenizer, []) == []  # a config that lists none: nothing stops generation


def test_the_generation_config_is_read_as_transformers_reads_it(tmp_path: Path) -> None:
    folder = model_dir(tmp_path / "model", stops=["<|end|>", "<|user|>"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    found, source = read_generation_stops(folder)
    assert found == ids(tokenizer, "<|end|>", "<|user|>") and source == f"{folder}: generation_config.json"
    (folder / "generation_config.json").unlink()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 5}))
    assert read_generation_stops(folder) == ([5], f"{folder}: config.json")
    (folder / "config.json").unlink()
    found, source = read_generation_stops(folder)
    assert found is None and "the tokenizer's EOS" in source


def test_the_trained_stops_come_from_the_pre_flight_report(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert trained_stops(run) == []  # a run without a report
    (tmp_path / PREFLIGHT_FILE).write_text(json.dumps({"stop_tokens": ["<|im_end|>"]}))
    assert trained_stops(run) == ["<|im_end|>"]


# What each family's own template writes after an answer, and the eos_token_id its model's generation config lists.
REAL = {
    "llama-3.1": ("<|eot_id|>", [128001, 128008, 128009]),
    "qwen2.5": ("<|im_end|>", [151645, 151643]),
    "qwen3": ("<|im_end|>", [151645, 151643]),
    "gemma": ("<end_of_turn>", [1, 106]),
    "phi-3": ("<|end|>", [32007, 32001, 32000]),
    "mistral": ("</s>", [2]),
}


@pytest.mark.parametrize("name", list(REAL))
def test_each_real_template_stops_first_at_its_end_of_turn(name: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir(name))
    end_of_turn, configured = REAL[name]
    stops = generation_stops(tokenizer, configured)
    assert stops[0] == tokenizer.convert_tokens_to_ids(end_of_turn)
    assert set(stops) == {*configured, tokenizer.eos_token_id}  # nothing beyond the model's own stops and its EOS
