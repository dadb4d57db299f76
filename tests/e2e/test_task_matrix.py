"""Every registered task inherits the run lifecycle's guarantees (lora_tune.training.lifecycle), as peft runs its
tests over every registered tuner: the run record, `save_total_limit`, early stopping with the best checkpoint kept,
kill -9 then --resume ending as the uninterrupted run, the SIGTERM checkpoint and exit 143, the divergence stop with
exit 1, and --overwrite that deletes no user's file. A task added to lora_tune.tasks.TASKS gets the whole matrix by
adding its recipe to TASK_RECIPES (a test fails until it does).
"""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.tasks import TASKS
from tests.conftest import FRUITS, fruit_rows, write_jsonl
from tests.helpers import build_tiny_vlm, colour_rows, labelled_rows, run_cli

RUN_SETTINGS = """\
training:
  {objective}learning_rate: {lr}
  max_steps: 8
  batch_size: 4
  max_length: 64
  warmup_steps: 0
  logging_steps: 1
  save_steps: 2
  save_total_limit: 1
  eval_strategy: steps
  eval_steps: 2
  gradient_checkpointing: false
"""
COMMON = """\
model:
  name: {model}
  dtype: float32
adapter:
  r: 4
  alpha: 8
  dropout: 0.0
datasets:
  - path: {train}
eval_datasets:
  - path: {valid}
"""


def _sft(root: Path) -> dict[str, str]:
    rows = fruit_rows(32, "alpaca")
    return {"train": rows[:24], "valid": rows[24:], "section": "", "objective": ""}


def _preference(root: Path) -> dict[str, str]:
    rng = random.Random(0)
    rows = []
    for i in range(32):
        fruit = FRUITS[i % len(FRUITS)]
        rows.append({"prompt": f"fruit number {i % 9}?", "chosen": fruit, "rejected": rng.choice(FRUITS[:-1])})
        if rows[-1]["rejected"] == fruit:
            rows[-1]["rejected"] = FRUITS[-1] if fruit != FRUITS[-1] else FRUITS[0]
    return {"train": rows[:24], "valid": rows[24:], "section": "", "objective": "objective: dpo\n  "}


def _classification(root: Path) -> dict[str, str]:
    section = (
        "task:\n  type: classification\n  text_column: sentence\n  label_column: kind\n  labels: [fruit, number]\n"
    )
    return {"train": labelled_rows(24, seed=1), "valid": labelled_rows(8, seed=2), "section": section, "objective": ""}


REWARD = """\
def distinct(completions, **columns):
    # varies over any sampled completions: the advantages are never all zero, so every step trains
    return [len(set(c[0]["content"])) / 10 for c in completions]
"""


def _rl(root: Path) -> dict[str, str]:
    (root / "reward.py").write_text(REWARD)
    rows = [{"prompt": f"fruit number {i % 9}?", "answer": FRUITS[i % 9]} for i in range(32)]
    section = "rl:\n  num_generations: 2\n  max_completion_length: 8\n  rewards:\n"
    section += f"    - function: {root / 'reward.py'}:distinct\n    - name: answer\n"
    return {"train": rows[:24], "valid": rows[24:], "section": section, "objective": "objective: grpo\n  "}


def _vision(root: Path) -> dict[str, str]:
    """QLoRA on a tiny LLaVA (its own base: a vision run needs an image-text-to-text model), projector trained."""
    rows = colour_rows(root, 32, seed=1)
    section = "vision:\n  train_projector: true\nquantization:\n  bits: 4\n"
    model = build_tiny_vlm(root / "vlm", "llava") if not (root / "vlm").is_dir() else root / "vlm"
    return {"train": rows[:24], "valid": rows[24:], "section": section, "objective": "", "model": model}


# The data and sections of a small run of each task: every other setting is the lifecycle's and the same for all.
TASK_RECIPES: dict[str, Callable[[Path], dict]] = {
    "sft": _sft,
    "preference": _preference,
    "classification": _classification,
    "rl": _rl,
    "vision": _vision,
}


def write_recipe(root: Path, model: Path, task: str, name: str, lr: float = 1e-2) -> Path:
    parts = TASK_RECIPES[task](root)
    train = write_jsonl(root / f"{task}-train.jsonl", parts["train"])
    valid = write_jsonl(root / f"{task}-valid.jsonl", parts["valid"])
    text = COMMON.format(model=parts.get("model", model), train=train, valid=valid) + parts["section"]
    text += RUN_SETTINGS.format(objective=parts["objective"], lr=lr) + f"output_dir: {root / name}\n"
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_every_registered_task_is_in_the_matrix():
    assert set(TASK_RECIPES) == set(TASKS), "add the new task's small recipe to TASK_RECIPES"


TASK_NAMES = sorted(TASKS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """One run of each task, start to end, in this process."""
    runs = {}
    for task in TASK_NAMES:
        root = tmp_path_factory.mktemp(task)
        assert main(["train", str(write_recipe(root, tiny_model_dir, task, "run"))]) == 0, task
        runs[task] = root / "run"
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_NAMES)
def test_the_run_record_and_the_checkpoint_limit(task: str, uninterrupted: dict[str, Path]):
    run = uninterrupted[task]
    record = [".lora-tune-run", "recipe.yaml", "environment.jsonl", "data_fingerprint.json", "preflight.json"]
    record += ["metrics.jsonl", "summary.json", "lineage.json", "loss.png"]
    assert [name for name in record if not (run / name).is_file()] == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["eval_loss"] is not None
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-8"], "save_total_limit: 1 keeps the newest checkpoint only"


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_NAMES)
def test_early_stopping_stops_and_the_best_checkpoint_is_the_adapter(task: str, tiny_model_dir: Path, tmp_path: Path):
    """An improvement threshold no evaluation reaches: training stops after `patience` evaluations, and the saved
    adapter is the checkpoint of the lowest evaluation loss logged."""
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path, tiny_model_dir, task, "run")
    stop_early = ["training.early_stopping_patience=1", "training.early_stopping_threshold=1000"]
    assert main(["train", str(recipe), *stop_early, "training.keep_best=true"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["stopped_early"] and summary["steps"] == 4, summary  # 8 planned: stopped after 2 evals
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in line]
    lowest = min(evals, key=lambda record: record["eval_loss"])
    assert summary["best"]["step"] == lowest["step"]
    best = load_file(run / "checkpoints" / f"checkpoint-{lowest['step']}" / "adapter_model.safetensors")
    saved = adapter_tensors(run)
    assert best.keys() == saved.keys() and all(bool((best[k] == saved[k]).all()) for k in best)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_NAMES)
def test_killed_then_resumed_ends_as_the_uninterrupted_run(task: str, uninterrupted, tiny_model_dir, tmp_path: Path):
    recipe = write_recipe(tmp_path, tiny_model_dir, task, "killed")
    killed = run_cli("train", str(recipe), fault=("kill-at-step", 5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "adapter").exists()
    assert main(["train", str(recipe), "--resume"]) == 0  # in this process: the kill needed one of its own
    reference, continued = adapter_tensors(uninterrupted[task]), adapter_tensors(tmp_path / "killed")
    assert reference.keys() == continued.keys()
    assert all(bool((reference[k] == continued[k]).all()) for k in reference), "bit-identical to the unbroken run"
    sampled = uninterrupted[task] / "completions.jsonl"  # an online RL run: what it sampled, by step
    if sampled.exists():
        resumed = (tmp_path / "killed" / "completions.jsonl").read_text()
        assert resumed == sampled.read_text(), "the completions sampled after the resume are the unbroken run's"


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_NAMES)
def test_sigterm_writes_a_checkpoint_and_exits_143(task: str, tiny_model_dir: Path, tmp_path: Path):
    recipe = write_recipe(tmp_path, tiny_model_dir, task, "stopped")
    stopped = run_cli("train", str(recipe), fault=("sigterm-in-step", 3))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert (tmp_path / "stopped" / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_NAMES)
def test_a_diverging_run_stops_with_exit_1(task: str, tiny_model_dir: Path, tmp_path: Path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, task, "diverged", lr=1e30)
    assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "Traceback" not in err
    assert not (tmp_path / "diverged" / "adapter").exists()


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_NAMES)
def test_overwrite_never_deletes_a_users_file(task: str, uninterrupted: dict[str, Path], tmp_path: Path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted[task], run)
    (run / "notes.txt").write_text("mine")
    recipe = run / "recipe.yaml"
    assert main(["train", str(recipe), f"output_dir={run}", "--overwrite"]) == 2
    assert "holds files lora-tune did not write (notes.txt)" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine" and (run / "adapter").is_dir()
