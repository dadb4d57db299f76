"""Kill a run anywhere, resume it, and end where an uninterrupted run ends: same adapter, same loss curve.

Real process deaths (SIGKILL) run in a subprocess (`tests/e2e/fault_runner.py`); the graceful SIGTERM stop is sent
to a real `lora-tune train` process. One uninterrupted run (module fixture) is the reference for all of them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.training.checkpoints import MANIFEST
from tests.helpers import MAX_STEPS, ROOT, SAVE_STEPS, run_cli
from tests.helpers import write_resume_recipe as write_recipe


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def token_counts(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["num_tokens"]) for r in records if "num_tokens" in r]


def assert_same_run(run: Path, reference: Path) -> None:
    import torch

    got, want = adapter(run), adapter(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert len(losses(reference)) == MAX_STEPS
    assert [s for s, _ in losses(run)] == [s for s, _ in losses(reference)]
    for (_, a), (_, b) in zip(losses(run), losses(reference), strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    # The count of trained tokens carries over the resume: per logged step and in the summary.
    assert token_counts(run) == token_counts(reference)
    summary, want = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    assert summary["tokens_seen"] == want["tokens_seen"] > 0


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def reference(work: Path, tiny_model_dir: Path) -> Path:
    """The uninterrupted run."""
    assert main(["train", str(write_recipe(work, tiny_model_dir, "reference"))]) == 0
    return work / "reference"


def test_sigkill_at_an_arbitrary_step_then_resume_matches_uninterrupted(
    work: Path, tiny_model_dir: Path, reference: Path, capsys: pytest.CaptureFixture
):
    recipe = write_recipe(work, tiny_model_dir, "killed")
    kill_at = random.Random(7).randint(3, MAX_STEPS - 1)  # between checkpoints, after at least one
    killed = run_cli("train", str(recipe), fault=("kill-at-step", kill_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = work / "killed"
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    last_saved = kill_at - kill_at % SAVE_STEPS
    assert (run / "checkpoints" / f"checkpoint-{last_saved}" / MANIFEST).is_file()

    assert main(["train", str(recipe), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"continuing from {run / 'checkpoints' / f'checkpoint-{last_saved}'} (step {last_saved})" in out
    assert_same_run(run, reference)
    # Both attempts are on record, the second one saying where it resumed from.
    attempts = [json.loads(line) for line in (run / "environment.jsonl").read_text().splitlines()]
    assert [a["resumed_from"] is not None for a in attempts] == [False, True]


def test_sigkill_then_resume_on_a_4bit_base_matches_uninterrupted(work: Path, tiny_model_dir: Path):
    """QLoRA: the adapter trains in bfloat16 on a 4-bit base; loading the checkpoint must not make it float32."""
    import torch

    assert main(["train", str(write_recipe(work, tiny_model_dir, "reference-4bit", quantized=True))]) == 0
    reference = work / "reference-4bit"
    assert {t.dtype for t in adapter(reference).values()} == {torch.bfloat16}

    recipe = write_recipe(work, tiny_model_dir, "killed-4bit", quantized=True)
    killed = run_cli("train", str(recipe), fault=("kill-at-step", 5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main(["train", str(recipe), "--resume"]) == 0
    assert {t.dtype for t in adapter(work / "killed-4bit").values()} == {torch.bfloat16}
    assert_same_run(work / "killed-4bit", reference)


def test_kill_while_writing_a_checkpoint_and_a_corrupted_one_are_skipped(
    work: Path, tiny_model_dir: Path, reference: Path, capsys: pytest.CaptureFixture
):
    recipe = write_recipe(work, tiny_model_dir, "torn")
    killed = run_cli("train", str(recipe), fault=("kill-in-save", 6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = work / "torn" / "checkpoints"
    torn = checkpoints / "checkpoint-6"
    assert (torn / "adapter_model.safetensors").is_file(), "the kill came after the adapter was written"
    assert not (torn / MANIFEST).exists()
    # And the newest complete one is damaged on disk afterwards: one flipped byte in the optimizer state.
    optimizer = checkpoints / "checkpoint-4" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))

    assert main(["train", str(recipe), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint-6: incomplete" in out
    assert "skipping checkpoint-4: optimizer.pt is corrupted" in out
    assert "(step 2)" in out
    assert (checkpoints / "broken" / "checkpoint-6").is_dir(), "bad checkpoints are set aside, not deleted"
    assert_same_run(work / "torn", reference)


@pytest.mark.parametrize("fault", ["kill-after-training", "kill-in-final-save", "sigterm-in-step"])
def test_stopped_after_the_last_step_then_resume_matches_uninterrupted(
    fault: str, work: Path, tiny_model_dir: Path, reference: Path, capsys: pytest.CaptureFixture
):
    """Every step trained, the final checkpoint sealed, then the process died before the adapter was in place (or
    was told to stop during the last step): the resume finishes the run without a step past max_steps."""
    name = f"last-{fault}"
    recipe = write_recipe(work, tiny_model_dir, name)
    stopped = run_cli("train", str(recipe), fault=(fault, MAX_STEPS - 1))
    expected = 128 + signal.SIGTERM if fault == "sigterm-in-step" else -signal.SIGKILL
    assert stopped.returncode == expected, stopped.stderr[-2000:]
    run = work / name
    assert (run / "checkpoints" / f"checkpoint-{MAX_STEPS}" / MANIFEST).is_file()
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    assert (run / ".adapter.tmp").is_dir() == (fault == "kill-in-final-save")

    assert main(["train", str(recipe), "--resume"]) == 0
    assert f"checkpoint-{MAX_STEPS} is the run's last step; training is complete" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["steps"] == MAX_STEPS
    assert not (run / ".adapter.tmp").exists()
    assert_same_run(run, reference)


def test_resume_at_an_epoch_end_after_an_evaluation_matches_uninterrupted(work: Path, tiny_model_dir: Path):
    """Several epochs of packed rows on a 4-bit base, an evaluation at each epoch's end, a constant schedule: the
    review's case. The evaluation drew from the global random generators after the epoch's last checkpoint was
    saved, so the resumed run shuffled the next epoch differently (adapters 0.19 apart); now it must not."""
    import torch

    overrides = [
        "training.max_steps=12",
        "val_size=0.2",
        "training.eval_strategy=epoch",
        "training.lr_scheduler=constant",
        "training.warmup_steps=0",
        "training.save_total_limit=null",
    ]
    reference = work / "epochs-reference"
    assert main(["train", str(write_recipe(work, tiny_model_dir, reference.name, quantized=True)), *overrides]) == 0
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in r for r in records) >= 2, "needs evaluations at several epoch ends"
    epoch_ends = [r["step"] for r in records if "eval_loss" in r and r["step"] % SAVE_STEPS == 0]
    kill_after = epoch_ends[0]  # the newest checkpoint is the one saved at the end of the first such epoch

    recipe = write_recipe(work, tiny_model_dir, "epochs-killed", quantized=True)
    killed = run_cli("train", str(recipe), *overrides, fault=("kill-at-step", kill_after + 1))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main(["train", str(recipe), *overrides, "--resume"]) == 0
    got, want = adapter(work / "epochs-killed"), adapter(reference)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert losses(work / "epochs-killed") == losses(reference)


def test_sigterm_saves_a_checkpoint_and_exits_with_a_resume_hint(work: Path, tiny_model_dir: Path, reference: Path):
    recipe = write_recipe(work, tiny_model_dir, "preempted")
    run = work / "preempted"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_tune.cli", "train", str(recipe)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(losses(run)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received: finishing this step" in err
    assert f"lora-tune train {recipe} --resume" in err
    stopped_at = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert stopped_at < MAX_STEPS
    assert (run / "checkpoints" / f"checkpoint-{stopped_at}" / MANIFEST).is_file()

    assert main(["train", str(recipe), "--resume"]) == 0
    assert_same_run(run, reference)


def test_second_signal_exits_at_once():
    code = (
        "import os, signal, time\n"
        "from lora_tune.training.signals import StopRequest, graceful_stop\n"
        "with graceful_stop(StopRequest()):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 128 + signal.SIGINT
    assert "SIGINT again: exiting at once" in done.stderr


def test_rotation_keeps_the_last_checkpoint_and_the_best_one(
    work: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    from transformers import Trainer

    recipe = write_recipe(work, tiny_model_dir, "best")
    original = Trainer._evaluate

    def rising_eval_loss(self, *args, **kwargs):  # noqa: ANN001, ANN202
        # The Trainer's own best-checkpoint tracking sees an eval loss that only rises: step 2 stays the best.
        metrics = original(self, *args, **kwargs)
        metrics["eval_loss"] = float(self.state.global_step)
        return metrics

    monkeypatch.setattr(Trainer, "_evaluate", rising_eval_loss)
    overrides = [
        "val_size=0.25",
        "training.eval_strategy=steps",
        "training.eval_steps=2",
        "training.save_total_limit=1",
        "training.keep_best=true",
    ]
    assert main(["train", str(recipe), *overrides]) == 0
    checkpoints = work / "best" / "checkpoints"
    kept = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    assert kept == ["checkpoint-2", f"checkpoint-{MAX_STEPS}"]
    assert all((checkpoints / name / MANIFEST).is_file() for name in kept)
