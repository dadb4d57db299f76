"""Faults in a real (tiny) run: each gives one clear line and leaves the run resumable."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.training.checkpoints import MANIFEST
from tests.helpers import MAX_STEPS
from tests.helpers import write_resume_recipe as write_recipe


def error_line(stderr: str) -> str:
    """The CLI's one error line (progress bars share stderr; they redraw with carriage returns)."""
    lines = [part for line in stderr.splitlines() for part in line.split("\r") if "error: " in part]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0][lines[0].index("error: ") :].strip()


def test_out_of_memory_in_a_step_gives_advice_and_the_run_resumes(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    import torch
    from transformers import Trainer

    recipe = write_recipe(tmp_path, tiny_model_dir, "oom")
    original = Trainer.training_step

    def training_step(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if self.state.global_step == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    assert main(["train", str(recipe)]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: out of memory during a training step: CUDA out of memory")
    assert "lower training.batch_size (now 4) and raise training.gradient_accumulation_steps" in err
    assert "Last complete checkpoint: checkpoint-4 (step 4)" in err
    assert err.endswith(f"Resume with: lora-tune train {recipe} --resume")

    monkeypatch.setattr(Trainer, "training_step", original)
    assert main(["train", str(recipe), "--resume"]) == 0
    assert json.loads((tmp_path / "oom" / "summary.json").read_text())["steps"] == MAX_STEPS


def test_disk_full_while_saving_is_clear_and_the_run_resumes(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    from transformers import Trainer

    recipe = write_recipe(tmp_path, tiny_model_dir, "full")
    original = Trainer._save_optimizer_and_scheduler

    def save(self, output_dir):  # noqa: ANN001, ANN202
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.pt"))
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)
    assert main(["train", str(recipe)]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"error: disk full while writing to {tmp_path / 'full' / 'checkpoints'}")
    assert "The unfinished checkpoint will be skipped on resume. Last complete checkpoint: checkpoint-2" in err
    checkpoints = tmp_path / "full" / "checkpoints"
    assert not (checkpoints / "checkpoint-4" / MANIFEST).exists()

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    assert main(["train", str(recipe), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint-4: incomplete" in out and "(step 2)" in out
    assert (checkpoints / f"checkpoint-{MAX_STEPS}" / MANIFEST).is_file()


def test_not_enough_free_disk_is_refused_before_training(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    import shutil

    from lora_tune.training import faults

    recipe = write_recipe(tmp_path, tiny_model_dir, "cramped")
    real = shutil.disk_usage
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 1024**2))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"output_dir: '{tmp_path / 'cramped'}' has 0.01 GiB free, the run needs about" in err
    assert "lower training.save_total_limit" in err
    assert not (tmp_path / "cramped" / "metrics.jsonl").exists(), "refused before the first step"


def test_dataset_file_vanished_or_truncated(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture):
    recipe = write_recipe(tmp_path, tiny_model_dir, "nodata")
    data = tmp_path / "train.jsonl"
    data.write_bytes(data.read_bytes()[:-20])  # cut inside the last row, as a copy interrupted midway leaves it
    assert main(["train", str(recipe)]) == 2
    assert error_line(capsys.readouterr().err).startswith(f"error: {data}: line 24 is not valid JSON: ")
    data.unlink()
    assert main(["train", str(recipe), "--overwrite"]) == 2
    assert "train.jsonl" in capsys.readouterr().err
