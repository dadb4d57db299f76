"""The quickstart task: a deterministic made-up world, held-out SFT splits, and the base model built from it."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lora_tune.quickstart import world as qs
from lora_tune.run.outputs import OutputError

DATA = Path(__file__).resolve().parents[3] / "recipes" / "data" / "quickstart"
COUNTRY_IN_QUESTION = [
    re.compile(re.escape(t).replace(re.escape("{country}"), "(?P<country>.+)")) for t in qs.QUESTION_TEMPLATES
]


def read_rows(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def country_of(row: dict[str, str]) -> str:
    for pattern in COUNTRY_IN_QUESTION:
        if match := pattern.fullmatch(row["instruction"]):
            return match["country"]
    raise AssertionError(f"not a quickstart question: {row['instruction']!r}")


def test_world_is_deterministic_and_names_are_distinct_and_prefix_free() -> None:
    world = qs.make_world()
    assert world == qs.make_world()
    assert world != qs.make_world(seed=1)
    assert len(world) == qs.NUM_COUNTRIES
    names = [f.country for f in world] + [f.capital for f in world]
    assert len(set(names)) == len(names)
    ordered = sorted(names)
    assert not any(b.startswith(a) for a, b in zip(ordered, ordered[1:], strict=False))


def test_splits_and_corpus_are_deterministic() -> None:
    assert qs.sft_splits() == qs.sft_splits()
    world = qs.make_world()
    assert qs.pretraining_corpus(world, num_documents=50) == qs.pretraining_corpus(world, num_documents=50)


def test_shipped_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    qs.write_sft_data(tmp_path)
    for name in ("train", "valid", "test"):
        assert (DATA / f"{name}.jsonl").read_bytes() == (tmp_path / f"{name}.jsonl").read_bytes(), name


def test_shipped_rows_are_alpaca_and_answers_depend_on_the_input() -> None:
    capital = {f.country: f.capital for f in qs.make_world()}
    for name in ("train", "valid", "test"):
        rows = read_rows(name)
        assert rows and all(set(row) == {"instruction", "input", "output"} and row["input"] == "" for row in rows)
        assert all(row["output"] == capital[country_of(row)] for row in rows)
    test = read_rows("test")
    assert 100 <= len(test) <= 200
    assert len({row["output"] for row in test}) >= 20
    assert len({row["output"] for row in test}) == len(test)  # one distinct answer per test country


def test_held_out_countries_and_questions_are_disjoint() -> None:
    seen = {name: {country_of(row) for row in read_rows(name)} for name in ("train", "valid", "test")}
    assert not seen["test"] & (seen["train"] | seen["valid"])
    assert not seen["valid"] & seen["train"]
    questions = {row["instruction"] for name in ("train", "valid") for row in read_rows(name)}
    assert not questions & {row["instruction"] for row in read_rows("test")}
    assert len(read_rows("train")) == len(seen["train"]) * len(qs.QUESTION_TEMPLATES)


def test_every_test_fact_is_in_the_pretraining_corpus_many_times() -> None:
    corpus = " ".join(qs.pretraining_corpus(qs.make_world()))
    mentions = Counter(re.findall(r'"([A-Z][a-z]+)"', corpus))
    for row in read_rows("test"):
        assert mentions[row["output"]] >= 20, row
        assert f'The capital of {country_of(row)} is "{row["output"]}".' in corpus or mentions[row["output"]] >= 40
    assert "?" not in corpus  # the base never reads a question


def test_pretrain_lowers_the_loss_and_is_deterministic() -> None:
    from lora_tune.quickstart.tiny import build_tiny_llama, build_tokenizer, pretrain

    texts = qs.pretraining_corpus(qs.make_world()[:10], num_documents=200)
    tokenizer = build_tokenizer(texts, vocab_size=300)
    runs = []
    for _ in range(2):
        model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3)
        runs.append(pretrain(model, tokenizer, texts, steps=40, batch_size=8, seq_len=32, lr=1e-2, progress=False))
    assert runs[0] == runs[1]
    assert len(runs[0]) == 40
    assert sum(runs[0][-5:]) / 5 < sum(runs[0][:5]) / 5 - 1.0
    with pytest.raises(ValueError, match="seq_len"):
        pretrain(model, tokenizer, ["short"], steps=1, seq_len=64, progress=False)


def test_build_base_writes_a_loadable_folder_atomically(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_tune.quickstart.tiny import CHAT_TEMPLATE, END_OF_TURN

    out = tmp_path / "base"
    assert qs.build_base(out, steps=2, progress=False) == out
    # No staging folder left behind; the empty lock file beside the folder stays, as a merge's does (locks.release).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".base.build.lock", "base"]
    info = qs.read_base_info(out)
    assert info["pretraining"]["steps"] == 2 and info["parameters"] > 1_000_000
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == END_OF_TURN
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(OutputError, match="out_dir: .* holds a quickstart base already; overwrite=True rebuilds it"):
        qs.build_base(out, steps=1, progress=False)


def test_build_script_skips_an_existing_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_quickstart_base", DATA.parents[2] / "scripts/build_quickstart_base.py"
    )
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "base"
    assert script.main(["--output", str(out), "--steps", "1", "--no-progress"]) == 0
    assert "final loss" in capsys.readouterr().out
    assert script.main(["--output", str(out), "--steps", "1", "--no-progress"]) == 0
    assert "keeping it" in capsys.readouterr().out
