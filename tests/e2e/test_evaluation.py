"""Training control and evaluation on a tiny model: early stopping keeps the best checkpoint, the plateau schedule
cuts the learning rate, `lora-tune eval` writes its reports with base vs tuned, `generate` and `chat` answer."""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.conftest import FRUITS, fruit_rows, write_jsonl

LEARNING_RATE = 3.0e-2
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
RECIPE = """\
model: {{name: {model}, dtype: float32}}
adapter: {{r: 8, alpha: 16, dropout: 0.0}}
datasets: [{{path: {train}}}]
eval_datasets: [{{path: {valid}}}]
training:
  learning_rate: {lr}
  max_steps: 40
  batch_size: 8
  packing: false  # padded batches of 8 examples: the contradicting validation set stops it within 40 steps
  eval_batch_size: 32
  max_length: 64
  warmup_steps: 0
  logging_steps: 2
  eval_strategy: steps
  eval_steps: 2
  save_steps: 2
  save_total_limit: 10
  early_stopping_patience: 2
  lr_scheduler: reduce_lr_on_plateau
  plateau_patience: 0
  gradient_checkpointing: false
  report_to: {trackers}
eval:
  max_new_tokens: 6
  batch_size: 8
output_dir: {out}
"""


def contradicting_rows(n: int) -> list[dict]:
    """The training questions with other answers: once the model fits the training data, this loss rises."""
    return [
        {"instruction": "Name the fruit.", "input": f"fruit number {i % 9}?", "output": FRUITS[(i + 4) % 9]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-run")
    train = write_jsonl(root / "train.jsonl", fruit_rows(40))
    valid = write_jsonl(root / "valid.jsonl", contradicting_rows(18))
    recipe = root / "recipe.yaml"
    recipe.write_text(
        RECIPE.format(
            model=tiny_model_dir,
            train=train,
            valid=valid,
            lr=LEARNING_RATE,
            out=root / "run",
            trackers=["tensorboard"] if HAS_TENSORBOARD else [],
        )
    )
    assert main(["train", str(recipe)]) == 0
    return root / "run"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _evaluations(run: Path) -> list[tuple[int, float]]:
    """(step, eval loss) of the evaluations during training (not the closing one of the best model)."""
    evals = [(r["step"], r["eval_loss"]) for r in _records(run) if "eval_loss" in r]
    return evals[:-1]


def test_early_stopping_stops_and_the_adapter_is_the_best_checkpoint(run: Path) -> None:
    from safetensors.torch import load_file

    summary = json.loads((run / "summary.json").read_text())
    evals = _evaluations(run)
    best_step, best_loss = min(evals, key=lambda e: e[1])
    # Stopped after `patience` evaluations in a row without improvement, long before max_steps.
    assert summary["steps"] < 40 and summary["best"]["stopped_early"]
    assert [step for step, _ in evals][-1] == summary["steps"]
    assert all(loss >= best_loss for step, loss in evals if step > best_step)
    assert len([step for step, _ in evals if step > best_step]) == 2
    assert summary["best"]["step"] == best_step != summary["steps"]
    assert summary["best"]["value"] == pytest.approx(best_loss)
    # The closing evaluation scores the reloaded best model; the saved adapter is that checkpoint's weights.
    assert summary["eval_loss"] == pytest.approx(best_loss, abs=1e-5)
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    best = load_file(run / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / f"checkpoint-{summary['steps']}" / "adapter_model.safetensors")
    assert saved.keys() == best.keys()
    assert all((saved[k] == best[k]).all() for k in saved)
    assert any((saved[k] != last[k]).any() for k in saved)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install lora-tune[tensorboard])")
def test_report_to_tensorboard_writes_event_files(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The trainer opens a writer for training and, after it closed that one, another for the closing evaluation.
    folders = sorted({p.parent for p in (run / "checkpoints" / "runs").glob("*/events.out.tfevents.*")})
    assert folders
    eval_losses = []
    for folder in folders:
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        eval_losses += [(e.step, e.value) for e in accumulator.Scalars("eval/loss")]
    during = eval_losses[: len(_evaluations(run))]  # in the order written
    assert [step for step, _ in during] == [step for step, _ in _evaluations(run)]
    assert [loss for _, loss in during] == pytest.approx([loss for _, loss in _evaluations(run)])


def test_eval_perplexity_is_logged(run: Path) -> None:
    for record in _records(run):
        if "eval_loss" in record:
            assert record["eval_perplexity"] == pytest.approx(math.exp(record["eval_loss"]))


def test_reduce_lr_on_plateau_halves_the_rate_after_each_evaluation_without_improvement(run: Path) -> None:
    # torch's ReduceLROnPlateau (mode min, patience 0, relative threshold 1e-4): each evaluation that does not beat
    # the best so far by that margin halves the learning rate from the next optimizer step on.
    cuts, best = [], math.inf
    for step, loss in _evaluations(run):
        if loss < best * (1 - 1e-4):
            best = loss
        else:
            cuts.append(step)
    train_logs = [(r["step"], r["learning_rate"]) for r in _records(run) if "learning_rate" in r]
    expected = [LEARNING_RATE * 0.5 ** sum(cut < step for cut in cuts) for step, _ in train_logs]
    assert cuts, "the contradicting validation set should stop improving"
    assert [lr for _, lr in train_logs] == pytest.approx(expected)


def test_eval_writes_json_markdown_and_plot_with_base_and_tuned(run: Path, capsys) -> None:
    write_jsonl(run / "test.jsonl", fruit_rows(18, "messages"))
    assert main(["eval", str(run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "fine-tuned" in out and "macro F1" in out
    report = json.loads((run / "eval.json").read_text())
    assert report["rows"] == 18 and report["task"] == "labels" and report["labels"] == FRUITS
    for side in ("base", "tuned"):
        score = report[side]
        assert 0 <= score["exact_match"] <= score["normalized_exact_match"] <= 1
        assert score["perplexity"] > 1
        classification = score["classification"]
        counts = classification["confusion"]["counts"]
        assert len(counts) == 9 and sum(map(sum, counts)) == 18
        # Accuracy on labels is the diagonal over all rows.
        assert classification["accuracy"] == pytest.approx(sum(counts[i][i] for i in range(9)) / 18)
    assert report["scored_tokens"] > 18  # each answer plus its end-of-turn token
    assert report["base"]["perplexity"] != report["tuned"]["perplexity"]
    assert report["examples"][0].keys() == {"input", "reference", "base", "tuned"}
    markdown = (run / "eval.md").read_text()
    assert "| metric | base | fine-tuned |" in markdown and "![train and eval loss" in markdown
    assert "confusion matrix" in markdown and "| fruit number 0? | apple |" in markdown
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from lora_tune.run.layout import foreign_entries

    assert foreign_entries(run) == []  # train + eval wrote only names that --overwrite may remove


def test_reference_perplexity_matches_the_trainers_eval_loss(run: Path) -> None:
    # One evaluation batch holds the whole validation set, so the trainer's eval loss is the mean NLL of exactly
    # the tokens `eval` scores; the closing evaluation ran on the saved (best) adapter.
    from lora_tune.tasks import evaluate_run

    report = evaluate_run(run, str(run.parent / "valid.jsonl"), base=False, progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert report.base is None
    assert math.log(report.tuned.perplexity) == pytest.approx(summary["eval_loss"], abs=1e-4)


def test_eval_without_a_saved_split_asks_for_data(run: Path, capsys) -> None:
    assert main(["eval", str(run), "--split", "heldout"]) == 2
    err = capsys.readouterr().err
    assert "no 'heldout' split saved in the run (heldout.jsonl not found); pass --data FILE" in err


def test_generate_streams_the_greedy_answer(run: Path, capsys) -> None:
    from lora_tune.inference.answers import generate_answers
    from lora_tune.inference.load import load_for_inference

    assert main(["generate", str(run), "fruit number 3?"]) == 0
    streamed = capsys.readouterr().out.strip()
    loaded = load_for_inference(run)
    question = [{"role": "user", "content": "fruit number 3?"}]
    (expected,) = generate_answers(
        loaded.model, loaded.tokenizer, [question], settings=loaded.settings, progress=False
    )
    assert streamed == expected


def test_chat_through_stdin_keeps_history_resets_and_exits(run: Path, monkeypatch, capsys) -> None:
    stdin = io.StringIO("fruit number 1?\nfruit number 2?\n/reset\nfruit number 2?\n/exit\nfruit number 5?\n")
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["chat", str(run), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 3  # nothing after /exit
    assert "(history cleared)" in out
    answers = [part.split("\n")[0].strip() for part in out.split("model> ")[1:]]
    # After /reset the same question is asked without history: the answer is the one-turn answer.
    from lora_tune.inference.chat import reply, with_settings
    from lora_tune.inference.load import load_for_inference

    loaded = with_settings(load_for_inference(run), {"max_new_tokens": 4})
    assert answers[2] == reply(loaded, [{"role": "user", "content": "fruit number 2?"}])
    two_turns = [
        {"role": "user", "content": "fruit number 1?"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "fruit number 2?"},
    ]
    assert answers[1] == reply(loaded, two_turns)


def test_chat_session_history(run: Path) -> None:
    from lora_tune.inference.chat import chat_loop
    from lora_tune.inference.load import load_for_inference

    out = io.StringIO()
    session = chat_loop(load_for_inference(run), system="Be brief.", stdin=io.StringIO("a\nb\n"), stdout=out)
    roles = [m["role"] for m in session.history]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert session.history[2]["content"] in out.getvalue()
    session.reset()
    assert session.history == [{"role": "system", "content": "Be brief."}]


def test_generate_and_chat_on_a_merged_folder(run: Path, tmp_path: Path, capsys) -> None:
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(merged), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "fruit number 4?", "--no-stream"]) == 0
    from_run = capsys.readouterr().out.strip()
    assert main(["generate", str(merged), "fruit number 4?", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == from_run
    from lora_tune.inference.chat import chat_loop, with_settings
    from lora_tune.inference.load import load_for_inference

    out = io.StringIO()
    loaded = with_settings(load_for_inference(merged), {"max_new_tokens": 6})  # the run's eval.max_new_tokens
    chat_loop(loaded, stdin=io.StringIO("fruit number 4?\n"), stdout=out)
    assert "(merged model)" in out.getvalue() and f"model> {from_run}" in out.getvalue()


def test_generate_refuses_a_folder_that_is_no_model(tmp_path: Path, capsys) -> None:
    assert main(["generate", str(tmp_path), "hi"]) == 2
    assert "neither a lora-tune run (recipe.yaml) nor a model folder (config.json)" in capsys.readouterr().err
