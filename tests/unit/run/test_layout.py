"""The run directory: lora-tune writes only into directories it made, --overwrite removes only what it wrote, and one
process at a time holds a run directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.run.layout import LOCK, MARKER, RunDir, prepare_run_dir, release_run_dir
from lora_tune.run.locks import LockedError
from lora_tune.run.outputs import OutputError

RECIPE = "model:\n  name: some/model\ndatasets:\n  - path: {data}\noutput_dir: {out}\n"


def project_folder(root: Path) -> dict[str, str]:
    """A user's project: its own recipe.yaml, data and source, as they would keep them."""
    files = {"recipe.yaml": "", "data/train.jsonl": '{"instruction": "a", "output": "b"}\n', "src/app.py": "x = 1\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return files


def contents(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_overwrite_never_deletes_a_project_folder_that_holds_its_own_recipe(tmp_path: Path, capsys):
    """The review's case: output_dir is the project folder itself, which has a recipe.yaml of its own."""
    project = tmp_path / "project"
    project_folder(project)
    (project / "recipe.yaml").write_text(RECIPE.format(data=project / "data/train.jsonl", out=project))
    before = contents(project)
    assert main(["train", str(project / "recipe.yaml"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds no lora-tune run" in err and "data" in err and len(err.strip().splitlines()) == 1
    assert contents(project) == before


def test_overwrite_of_a_run_with_a_user_file_in_it_refuses_and_deletes_nothing(tmp_path: Path):
    run = prepare_run_dir(tmp_path / "run", overwrite=False)
    release_run_dir(run)
    (run.recipe).write_text("old: run\n")
    (run.root / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files lora-tune did not write \(notes.txt\).*nothing was deleted"):
        prepare_run_dir(run.root, overwrite=True)
    assert (run.root / "notes.txt").read_text() == "mine" and run.recipe.read_text() == "old: run\n"
    # ...and the refusal let go of the lock: a later attempt is not told the directory is busy.
    (run.root / "notes.txt").unlink()
    release_run_dir(prepare_run_dir(run.root, overwrite=True))


def test_overwrite_removes_exactly_what_a_run_wrote(tmp_path: Path):
    run = prepare_run_dir(tmp_path / "run", overwrite=False)
    release_run_dir(run)
    for name in ("recipe.yaml", "metrics.jsonl", "adapter/adapter_model.safetensors", "checkpoints/checkpoint-2/x"):
        (run.root / name).parent.mkdir(parents=True, exist_ok=True)
        (run.root / name).write_text("old")
    (run.root / ".recipe.yaml.k2j3.tmp").write_text("half-written by a killed run")
    run = prepare_run_dir(run.root, overwrite=True)
    release_run_dir(run)
    assert sorted(p.name for p in run.root.iterdir()) == sorted([LOCK, MARKER])


def test_a_run_from_before_the_marker_is_still_a_run(tmp_path: Path):
    legacy = tmp_path / "run"
    (legacy / "adapter").mkdir(parents=True)
    for name in ("recipe.yaml", "summary.json", "metrics.jsonl"):
        (legacy / name).write_text("{}")
    with pytest.raises(OutputError, match="already holds a run"):
        prepare_run_dir(legacy, overwrite=False)
    release_run_dir(prepare_run_dir(legacy, overwrite=True))
    assert (legacy / MARKER).is_file() and not (legacy / "adapter").exists()


HOLDER = """
import sys, time
from lora_tune.run.layout import prepare_run_dir
prepare_run_dir(sys.argv[1], overwrite=False, resume=True)
print("locked", flush=True)
time.sleep(60)
"""


def hold_in_another_process(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_a_live_run_directory_refuses_in_one_line(tmp_path: Path, alpaca_file: Path, capsys):
    root = tmp_path / "run"
    holder = hold_in_another_process(root)
    try:
        for flags in ([], ["--overwrite"], ["--resume"]):
            recipe = tmp_path / "recipe.yaml"
            recipe.write_text(RECIPE.format(data=alpaca_file, out=root))
            assert main(["train", str(recipe), *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert f"is in use by another lora-tune process (pid {holder.pid} on " in err, err
            assert len(err.splitlines()) == 1
        assert (root / MARKER).is_file()  # --overwrite deleted nothing under the live run
        with pytest.raises(LockedError):
            prepare_run_dir(root, overwrite=False, resume=True)
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path, caplog):
    root = tmp_path / "run"
    holder = hold_in_another_process(root)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid}" in (root / LOCK).read_text()  # the dead holder never released it
    deadline = time.monotonic() + 5
    with caplog.at_level("INFO", logger="lora_tune"):
        while True:  # the kernel drops a killed process's flock at once; allow for a slow reaper
            try:
                run = prepare_run_dir(root, overwrite=False, resume=True)
                break
            except LockedError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    assert "was left by a process that no longer runs" in caplog.text
    assert f"pid {os.getpid()}" in (root / LOCK).read_text()
    release_run_dir(run)
    assert (root / LOCK).read_text() == ""  # a clean release empties it


def test_train_releases_the_lock_when_it_fails(tmp_path: Path, alpaca_file: Path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=alpaca_file, out=tmp_path / "run"))
    assert main(["train", str(recipe)]) != 0  # some/model cannot be loaded offline
    release_run_dir(prepare_run_dir(RunDir(tmp_path / "run").root, overwrite=False, resume=True))


def _sysfs_is_read_only() -> bool:
    try:
        (Path("/sys") / ".lora-tune-probe").touch()
    except OSError:
        return True
    return False


needs_read_only_dir = pytest.mark.skipif(
    not Path("/sys").is_dir() or not _sysfs_is_read_only(), reason="no folder here that even root cannot write"
)


@needs_read_only_dir
def test_train_into_a_folder_it_cannot_create_is_one_line_before_any_work(tmp_path: Path, alpaca_file: Path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=alpaca_file, out="/sys/lora-tune-run"))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output_dir: cannot create '/sys/lora-tune-run'") and len(err.splitlines()) == 1


@needs_read_only_dir
def test_a_folder_even_root_cannot_write_is_refused_in_one_line():
    from lora_tune.run.layout import ensure_writable

    with pytest.raises(OutputError, match="'/sys' is not writable"):
        ensure_writable(Path("/sys"), "output")


def test_eval_refuses_an_unwritable_run_directory_before_loading_anything(tmp_path: Path, monkeypatch, capsys):
    """Root writes through permission bits, so the folder's refusal is simulated where the probe writes."""
    import tempfile

    import lora_tune.tasks.sft.evaluate

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "recipe.yaml").write_text("model:\n  name: some/model\ndatasets:\n  - path: x.jsonl\noutput_dir: run\n")

    def read_only(*args, **kwargs):  # noqa: ANN002, ANN003
        raise PermissionError(13, "Permission denied")

    def never(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the model was loaded before the write check")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(lora_tune.tasks.sft.evaluate, "load_run_model", never)
    assert main(["eval", str(run), "--data", str(tmp_path / "held_out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"RUN_DIR: '{run}' is not writable (Permission denied)" in err and len(err.splitlines()) == 1
