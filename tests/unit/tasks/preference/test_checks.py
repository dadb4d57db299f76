"""The pre-flight of a preference recipe refuses, before anything tokenizes or loads, data that cannot teach a
preference: a KTO training set with one label (a failed `one-class` check, like the rows that prefer nothing), and a
row over the memory bound (one error line at once, as for an SFT row)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.conftest import FRUITS
from tests.helpers import model_dir, write_check_recipe

KTO = {"objective": "kto", "max_length": 64}


def kto_rows(labels: list[bool]) -> list[dict]:
    return [
        {"prompt": f"fruit number {i}?", "completion": FRUITS[i % len(FRUITS)], "label": label}
        for i, label in enumerate(labels)
    ]


def pair_rows(n: int) -> list[dict]:
    return [
        {"prompt": f"fruit number {i}?", "chosen": FRUITS[i % len(FRUITS)], "rejected": FRUITS[(i + 1) % len(FRUITS)]}
        for i in range(n)
    ]


ONE_CLASS = [(True, "true (desirable)", "false"), (False, "false (undesirable)", "true")]


@pytest.mark.parametrize(("label", "kind", "other"), ONE_CLASS)
def test_a_kto_set_of_one_label_fails_the_check_and_train_refuses_it(
    label: bool, kind: str, other: str, tmp_path: Path, capsys
) -> None:
    model = model_dir(tmp_path / "m")  # a tokenizer and no weights: train must refuse before loading a model
    recipe = write_check_recipe(tmp_path, model, kto_rows([label] * 12), training=KTO)
    assert main(["check", str(recipe)]) == 2
    out = capsys.readouterr().out
    data = tmp_path / "train.jsonl"
    assert (
        f"FAIL  one-class            {data} row 1 (and 11 more rows): all 12 training rows are labelled {kind}; KTO "
        f"learns a preference from desirable and undesirable answers together; fix: add rows labelled {other}"
    ) in out
    assert "1 check failed (one-class)" in out
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "pre-flight check failed" in err and f"one-class: {data} row 1 (and 11 more rows): all 12" in err
    assert not (tmp_path / "run" / "adapter").exists()


def test_with_the_pre_flight_set_to_warn_the_data_itself_refuses_a_one_class_set(tmp_path: Path, capsys) -> None:
    model = model_dir(tmp_path / "m")
    recipe = write_check_recipe(tmp_path, model, kto_rows([True] * 12), training=KTO, preflight={"on_failure": "warn"})
    assert main(["data", str(recipe)]) == 2  # what train reads after a pre-flight told to warn
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: {tmp_path / 'train.jsonl'}: field 'label': all 12 training rows are labelled true (desirable); KTO "
        "learns a preference from desirable and undesirable answers together; add rows labelled false"
    ]


def test_a_kto_set_with_both_labels_passes(tmp_path: Path, capsys) -> None:
    model = model_dir(tmp_path / "m")
    recipe = write_check_recipe(tmp_path, model, kto_rows([True, True, False] * 4), training=KTO)
    assert main(["check", str(recipe)]) == 0
    assert "PASS  one-class            8 desirable and 4 undesirable training rows" in capsys.readouterr().out


@pytest.mark.parametrize(("objective", "column"), [("dpo", "chosen"), ("kto", "completion")])
def test_a_preference_row_over_the_bound_is_refused_at_once_like_an_sft_row(
    objective: str, column: str, tmp_path: Path, capsys
) -> None:
    """A 15.6 MB chosen answer passed `check` in 42 s using 3.3 GB; now one line, before anything tokenizes it."""
    model = model_dir(tmp_path / "m")
    rows = pair_rows(12) if objective == "dpo" else kto_rows([True, False] * 6)
    rows[5][column] = "apple " * 700_000  # 4,200,000 characters: over the 4,000,000 a row may have
    recipe = write_check_recipe(tmp_path, model, rows, training={"objective": objective, "max_length": 64})
    size = 4_200_000 + len("fruit number 5?") + len("user") + len("assistant") * (2 if objective == "dpo" else 1)
    size += len(rows[5].get("rejected", ""))
    expected = (
        f"error: {tmp_path / 'train.jsonl'}: line 6: field '{column}': has {size:,} characters of text, over the "
        "4,000,000 characters of text a row may have (a bound on the memory tokenizing one row takes); shorten or "
        "split the row"
    )
    for verb in ("check", "data", "train"):
        assert main([verb, str(recipe)]) == 2
        assert capsys.readouterr().err.splitlines() == [expected], verb


def test_a_generation_config_that_lists_no_eos_fails_the_stop_check_as_in_sft(tmp_path: Path, capsys) -> None:
    """Nothing would stop generation: the SFT pre-flight fails there, and so does the preference one (it used to
    fall back to the tokenizer's EOS and pass)."""
    model = model_dir(tmp_path / "m", stops=[])
    recipe = write_check_recipe(tmp_path, model, pair_rows(12), training={"objective": "dpo", "max_length": 64})
    assert main(["check", str(recipe)]) == 2
    out = capsys.readouterr().out
    assert "nothing stops generation" in out and "lists no eos token id" in out
