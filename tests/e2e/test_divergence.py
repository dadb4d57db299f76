"""A run whose weights stop being finite stops there, says so in one line and saves nothing NaN (the review: an
infinite learning rate trained to an all-NaN adapter, exited 0 and reported train_loss 0.0)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import run_cli
from tests.helpers import write_resume_recipe as write_recipe


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path, tiny_model_dir: Path):
    import torch
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path, tiny_model_dir, "diverged")
    # Finite, so the recipe is valid; the second Adam update at this rate overflows the adapter to NaN.
    done: subprocess.CompletedProcess = run_cli("train", str(recipe), "training.learning_rate=1e30")
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged at step" in errors[0] and "is not finite" in errors[0], errors
    assert "Traceback" not in done.stderr
    run = tmp_path / "diverged"
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "the steps before the divergence were checkpointed"
    assert f"the last good checkpoint is {checkpoints[-1]}" in errors[0]
    for checkpoint in checkpoints:  # no checkpoint holds a non-finite weight
        weights = load_file(checkpoint / "adapter_model.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), checkpoint
