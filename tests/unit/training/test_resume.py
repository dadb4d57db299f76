"""Resume decisions without training: sealed checkpoints, what may change in a recipe, data identity, provenance."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lora_tune.recipe.load import load_recipe
from lora_tune.run.outputs import OutputError
from lora_tune.training.checkpoints import find_resume_point, rotate, verify_checkpoint, write_manifest
from lora_tune.training.resume import ResumeError, recipe_changes, truncate_metrics
from lora_tune.training.run_folder import open_run

RECIPE = """\
model:
  name: some/model
adapter:
  r: 8
datasets:
  - path: {data}
training:
  max_steps: 100
output_dir: {out}
"""


def fake_checkpoint(root: Path, step: int, *, seal: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w" * 100 + bytes([step]))
    (path / "optimizer.pt").write_bytes(b"o" * 300)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if seal:
        write_manifest(path, step)
    return path


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(data=data, out=tmp_path / "run"))
    return path


def test_only_sealed_and_intact_checkpoints_count(tmp_path: Path):
    good = fake_checkpoint(tmp_path, 2)
    assert verify_checkpoint(good) is None
    torn = fake_checkpoint(tmp_path, 4, seal=False)
    assert "incomplete" in verify_checkpoint(torn)
    truncated = fake_checkpoint(tmp_path, 6)
    (truncated / "optimizer.pt").write_bytes(b"o" * 10)
    assert verify_checkpoint(truncated) == "optimizer.pt has 10 bytes, expected 300"
    flipped = fake_checkpoint(tmp_path, 8)
    (flipped / "optimizer.pt").write_bytes(b"x" * 300)
    assert verify_checkpoint(flipped) == "optimizer.pt is corrupted (checksum mismatch)"
    missing = fake_checkpoint(tmp_path, 10)
    (missing / "adapter_model.safetensors").unlink()
    assert verify_checkpoint(missing) == "adapter_model.safetensors is missing"

    point = find_resume_point(tmp_path)
    assert point.checkpoint == good and point.step == 2
    assert [p.name for p, _ in point.skipped] == ["checkpoint-10", "checkpoint-8", "checkpoint-6", "checkpoint-4"]


def test_no_checkpoint_means_step_zero(tmp_path: Path):
    assert find_resume_point(tmp_path / "none").checkpoint is None
    fake_checkpoint(tmp_path, 3, seal=False)
    point = find_resume_point(tmp_path)
    assert point.checkpoint is None and point.step == 0 and len(point.skipped) == 1


def test_rotation_deletes_only_what_a_newer_sealed_checkpoint_replaces(tmp_path: Path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 4, seal=False)  # being written right now: rotation must not count or touch it
    rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    write_manifest(tmp_path / "checkpoint-4", 4)
    rotate(tmp_path, keep=2, protect=tmp_path / "checkpoint-2")  # the best one survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_harmless_recipe_changes_pass_and_the_rest_are_listed():
    old = {"adapter": {"r": 8}, "training": {"logging_steps": 10, "max_steps": 100, "seed": 1}, "output_dir": "a"}
    new = {"adapter": {"r": 16}, "training": {"logging_steps": 1, "max_steps": 200, "seed": 2}, "output_dir": "b"}
    blocking, harmless = recipe_changes(old, new)
    assert blocking == ["adapter.r: 8 -> 16", "training.seed: 1 -> 2"]
    assert [h.split(":")[0] for h in harmless] == ["output_dir", "training.logging_steps", "training.max_steps"]
    shorter = {**old, "training": {**old["training"], "max_steps": 50}}
    assert recipe_changes(old, shorter)[0] == ["training.max_steps: 100 -> 50"]
    batch = {"training": {"batch_size": 8, "gradient_accumulation_steps": 1}}
    halved = {"training": {"batch_size": 4, "gradient_accumulation_steps": 2}}
    assert recipe_changes(batch, halved)[0] == []
    smaller = {"training": {"batch_size": 4, "gradient_accumulation_steps": 1}}
    assert recipe_changes(batch, smaller)[0] == ["training.batch_size: 8 -> 4"]
    datasets_old = {"datasets": [{"path": "a.jsonl", "limit": None}]}
    datasets_new = {"datasets": [{"path": "a.jsonl", "limit": 5}]}
    assert recipe_changes(datasets_old, datasets_new)[0] == ["datasets[0].limit: None -> 5"]


def test_resume_refuses_a_changed_recipe_naming_the_keys(recipe_file: Path):
    open_run(load_recipe(recipe_file), overwrite=False, resume=False, argv=["lora-tune"])
    changed = load_recipe(recipe_file, ["adapter.r=16", "training.learning_rate=0.1", "training.logging_steps=1"])
    with pytest.raises(ResumeError) as err:
        open_run(changed, overwrite=False, resume=True, argv=["lora-tune"])
    message = str(err.value)
    assert "adapter.r: 8 -> 16" in message and "training.learning_rate: 0.0002 -> 0.1" in message
    assert "logging_steps" not in message
    # Harmless changes resume (from step 0 here: nothing was saved yet).
    run, start = open_run(load_recipe(recipe_file, ["training.logging_steps=1"]), overwrite=False, resume=True)
    assert start.checkpoint is None


def test_resume_refuses_changed_or_vanished_data(recipe_file: Path, tmp_path: Path):
    recipe = load_recipe(recipe_file)
    open_run(recipe, overwrite=False, resume=False, argv=["lora-tune"])
    data = tmp_path / "train.jsonl"
    data.write_text(data.read_text()[:-5])  # truncated after the run started
    with pytest.raises(ResumeError, match=r"train.jsonl: dataset file changed since the run started"):
        open_run(recipe, overwrite=False, resume=True)
    data.unlink()
    with pytest.raises(ResumeError, match="dataset file is gone"):
        open_run(recipe, overwrite=False, resume=True)


def test_resume_auto_in_the_recipe_and_refusals(recipe_file: Path, tmp_path: Path):
    recipe = load_recipe(recipe_file)
    open_run(recipe, overwrite=False, resume=False)
    with pytest.raises(OutputError, match="pass --resume to continue it, --overwrite to replace it"):
        open_run(recipe, overwrite=False, resume=False)
    with pytest.raises(OutputError, match="exclude each other"):
        open_run(recipe, overwrite=True, resume=True)
    run, _ = open_run(load_recipe(recipe_file, ["training.resume=auto"]), overwrite=False, resume=False)
    (run.root / "eval.json").write_text("{}")
    run, _ = open_run(load_recipe(recipe_file, ["training.resume=auto"]), overwrite=True, resume=False)
    assert not (run.root / "eval.json").exists(), "--overwrite wins over the recipe's resume: auto"
    (run.root / "keep.txt").write_text("x")  # but it removes nothing lora-tune did not write
    with pytest.raises(OutputError, match=r"did not write \(keep.txt\)"):
        open_run(load_recipe(recipe_file, ["training.resume=auto"]), overwrite=True, resume=False)
    (run.root / "keep.txt").unlink()
    (run.root / "summary.json").write_text("{}")
    with pytest.raises(ResumeError, match="already finished"):
        open_run(recipe, overwrite=False, resume=True)
    # A folder with foreign files is never a run to resume.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds no lora-tune run"):
        open_run(load_recipe(recipe_file, [f"output_dir={foreign}"]), overwrite=False, resume=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_metrics_after_the_checkpoint_are_dropped(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert truncate_metrics(path, 4) == 4
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_environment_records_versions_command_and_git_commit(tmp_path: Path, recipe_file: Path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", recipe_file.name], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "r"], check=True
    )
    commit = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    run, _ = open_run(
        load_recipe(recipe_file),
        overwrite=False,
        resume=False,
        recipe_path=str(recipe_file),
        argv=["lora-tune", "train", str(recipe_file), "training.seed=3"],
    )
    record = json.loads((run.root / "environment.jsonl").read_text())
    assert record["command"] == f"lora-tune train {recipe_file} training.seed=3"
    assert record["recipe_git"] == {"commit": commit, "recipe_modified": False, "remote": None}
    assert record["packages"]["transformers"] and record["packages"]["torch"] and record["python"]
    assert (run.root / "recipe.yaml").is_file() and (run.root / "data_fingerprint.json").is_file()


def test_keep_best_tracks_the_best_checkpoint_and_rotation_is_lora_tunes(recipe_file: Path):
    import torch

    from lora_tune.errors import RecipeError
    from lora_tune.training.trl_args import to_sft_config

    with pytest.raises(RecipeError, match="keep_best: reads the validation metric"):
        load_recipe(recipe_file, ["training.keep_best=true"])
    ok = load_recipe(
        recipe_file,
        ["training.keep_best=true", "val_size=0.2", "training.eval_strategy=steps",
         "training.eval_steps=5", "training.save_steps=10"],
    )  # fmt: skip
    args = to_sft_config(ok, Path("unused"), torch.float32)
    assert args.metric_for_best_model in ("loss", "eval_loss") and args.greater_is_better is False
    assert args.save_total_limit is None, "rotation is lora_tune's, after sealing"
