"""`lora-tune eval`, `generate` and `chat` on the run kinds besides a causal-LM adapter: partial and full
fine-tuning (a transformers folder in model/), and a classification head (predicted, not generated)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.recipe.load import load_recipe
from tests.conftest import fruit_rows, write_jsonl
from tests.helpers import labelled_rows, tiny_recipe, write_case


@pytest.fixture(scope="module", params=["full", "partial"])
def model_run(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from lora_tune import train

    root = tmp_path_factory.mktemp(f"eval-{request.param}")
    train(tiny_recipe(request.param, tiny_model_dir, root, steps=12))
    assert (root / "run" / "model" / "config.json").is_file() and not (root / "run" / "adapter").exists()
    return root / "run"


def test_eval_of_a_model_folder_run_scores_base_and_tuned(model_run: Path, tiny_model_dir: Path, capsys) -> None:
    data = write_jsonl(model_run.parent / "held.jsonl", fruit_rows(18, "messages"))
    assert main(["eval", str(model_run), "--data", str(data)]) == 0
    assert "base" in capsys.readouterr().out
    report = json.loads((model_run / "eval.json").read_text())
    assert report["rows"] == 18 and report["examples"][0].keys() == {"input", "reference", "base", "tuned"}
    assert report["base"]["perplexity"] > 1 and report["tuned"]["perplexity"] > 1
    # Training moved the weights: the two sides are different models (the base is the recipe's, reloaded).
    assert report["base"]["perplexity"] != pytest.approx(report["tuned"]["perplexity"], rel=1e-6)
    assert "| metric | base | fine-tuned |" in (model_run / "eval.md").read_text()
    assert (model_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --no-base: the tuned side alone, scored the same.
    from lora_tune.tasks import evaluate_run

    tuned_only = evaluate_run(model_run, str(data), base=False, progress=False)
    assert tuned_only.base is None
    assert tuned_only.tuned.perplexity == pytest.approx(report["tuned"]["perplexity"])


def test_generate_and_chat_load_the_saved_model_folder(model_run: Path, capsys) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from lora_tune.inference.chat import chat_loop, reply
    from lora_tune.inference.load import load_for_inference

    assert main(["generate", str(model_run), "fruit number 2?", "--no-stream"]) == 0
    answer = capsys.readouterr().out.strip()
    loaded = load_for_inference(model_run)
    assert "(fine-tuned model)" in loaded.description
    # The same answer from the folder loaded with vanilla transformers.
    vanilla = AutoModelForCausalLM.from_pretrained(model_run / "model", dtype=torch.float32).eval()
    same = type(loaded)(vanilla, loaded.tokenizer, loaded.settings, "vanilla")
    assert reply(same, [{"role": "user", "content": "fruit number 2?"}]) == answer
    out = io.StringIO()
    chat_loop(loaded, stdin=io.StringIO("fruit number 2?\n"), stdout=out)
    assert f"model> {answer}" in out.getvalue()


def test_eval_refuses_pickle_weights_in_the_run_model(tmp_path: Path, model_run: Path, capsys) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(model_run, copy)
    for weights in (copy / "model").glob("*.safetensors"):
        weights.rename(weights.with_name("pytorch_model.bin"))
    assert (
        main(
            [
                "eval",
                str(copy),
                "--data",
                str(write_jsonl(tmp_path / "d.jsonl", fruit_rows(2, "messages"))),
                "--no-base",
            ]
        )
        == 2
    )
    assert "has only pickle weights (pytorch_model.bin)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("adapter", "lr"),
    [({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 1e-2), ({"method": "full"}, 1e-3)],
    ids=["lora", "full"],
)
def test_eval_of_a_classification_head(tiny_model_dir: Path, tmp_path: Path, adapter: dict, lr: float, capsys):
    from lora_tune import train

    recipe = write_case(tmp_path, tiny_model_dir, adapter, lr)
    # The validation rows again as test data: eval must reproduce the trainer's closing accuracy on them.
    recipe.write_text(recipe.read_text() + f"test_datasets:\n  - path: {tmp_path / 'valid.jsonl'}\n")
    train(load_recipe(recipe))
    run = tmp_path / "run"
    assert (run / "test.jsonl").read_text().splitlines()[0] == json.dumps(labelled_rows(40, seed=2)[0])

    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "majority class" in out and "not scored" in out
    report = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert report["task"] == "head" and report["base"] is None and report["rows"] == 40
    tuned = report["tuned"]["classification"]
    assert tuned["accuracy"] == pytest.approx(summary["eval_accuracy"]) and tuned["accuracy"] >= 0.8
    counts = tuned["confusion"]["counts"]
    assert sum(map(sum, counts)) == 40 and tuned["accuracy"] == pytest.approx((counts[0][0] + counts[1][1]) / 40)
    assert [c["support"] for c in tuned["per_class"].values()] == [20, 20]
    # Balanced rows: predicting the majority label is right half the time and never for the other class.
    baseline = report["baseline"]["classification"]
    assert baseline["accuracy"] == 0.5 and 0 in (
        baseline["per_class"]["fruit"]["recall"],
        baseline["per_class"]["number"]["recall"],
    )
    markdown = (run / "eval.md").read_text()
    assert "| metric | majority class | fine-tuned |" in markdown and "confusion matrix" in markdown
    assert "untrained" in markdown

    # --data: a file of labelled rows; an unknown label names the file and row.
    rows = labelled_rows(6, seed=5)
    rows[2]["kind"] = "vegetable"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["eval", str(run), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 3" in err and "vegetable" in err

    # A classification run does not generate.
    assert main(["generate", str(run), "one two"]) == 2
    assert "does not generate" in capsys.readouterr().err
