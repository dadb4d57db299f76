"""Every command that writes a folder replaces only what lora-tune wrote there (lora_tune.run.outputs).

One table of commands (train, merge, export, the quickstart's base build), each walked through the same cases, with
and without --overwrite: a user's file at the top of the folder, one nested in a sub-folder, a dotfile, a folder named
like the command's build folder, and the folder the command reads from as its output. Each case starts from a real
earlier output of the command (so the folder is one lora-tune wrote) with the user's entry added; the command must
exit 2 with one line, and every byte of the folder and beside it must be as it was. A control case shows that the
same command with --overwrite replaces the earlier output when nothing else is there.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.conftest import fruit_rows, write_jsonl
from tests.helpers import ROOT, tiny_llama_with_real_vocab, write_resume_recipe


@dataclass
class Command:
    """A command that writes a folder: how to run it into `output`, and the user folder named like its build
    folder (`inside`: in the output folder; else beside it)."""

    name: str
    run: Callable[[Path, list[str]], int]
    build_like: str
    inside: bool
    overwrite_flag: str = "--overwrite"
    keeps_without_flag: bool = False  # the quickstart's script keeps an existing base (exit 0) unless --force


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """The sources: a tiny base, its training data and recipe, a finished run, a model folder on a real vocabulary
    (llama.cpp's converter refuses a test-trained tokenizer) to export."""
    root = tmp_path_factory.mktemp("outputs")
    recipe = write_resume_recipe(root, tiny_model_dir, "run")
    assert main(["train", str(recipe)]) == 0
    return {
        "root": root,
        "base": tiny_model_dir,
        "recipe": recipe,
        "run": root / "run",
        "model": tiny_llama_with_real_vocab(root / "real-vocab-model"),
    }


def commands(world: dict[str, Path]) -> dict[str, Command]:
    def train(output: Path, flags: list[str]) -> int:
        return main(["train", str(world["recipe"]), f"output_dir={output}", *flags])

    def merge(output: Path, flags: list[str]) -> int:
        return main(["merge", str(world["run"]), "--output", str(output), "--no-verify", *flags])

    def export(output: Path, flags: list[str]) -> int:
        return main(["export", str(world["model"]), "--quant", "f16", "--output", str(output), *flags])

    def quickstart_base(output: Path, flags: list[str]) -> int:
        script = ROOT / "scripts" / "build_quickstart_base.py"
        sys.path.insert(0, str(script.parent))
        try:
            import build_quickstart_base
        finally:
            sys.path.remove(str(script.parent))
        return build_quickstart_base.main(["--output", str(output), "--steps", "2", "--no-progress", *flags])

    return {
        "train": Command("train", train, ".adapter.tmp", inside=True),
        "merge": Command("merge", merge, ".{name}.merge-abc123", inside=False),
        "export": Command("export", export, ".export-backup", inside=True),
        "quickstart base": Command(
            "quickstart base", quickstart_base, ".{name}.building-x", False, "--force", keeps_without_flag=True
        ),
    }


@pytest.fixture(scope="module")
def earlier(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real earlier output of each command, copied into each case."""
    root = tmp_path_factory.mktemp("earlier")
    made = {}
    for name, command in commands(world).items():
        made[name] = root / name.replace(" ", "-") / "out"
        made[name].parent.mkdir()
        assert command.run(made[name], []) == 0, name
    return made


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (links not followed), with the bytes of each file; permissions not included."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            found[rel] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return found


def plant(case: str, output: Path, command: Command) -> None:
    """The user's entry of `case` in (or beside) an earlier output of the command."""
    if case == "user file at the top":
        (output / "thesis.txt").write_text("three years of work")
    elif case == "user file nested":
        (output / "sub").mkdir()
        (output / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 a photo")
    elif case == "user dotfile":
        (output / ".env").write_text("MY_SETTING=1\n")
    elif case == "user folder named like a build folder":
        where = output if command.inside else output.parent
        folder = where / command.build_like.format(name=output.name)
        folder.mkdir()
        (folder / "backup.bin").write_bytes(b"the user's backup")


CASES = ["user file at the top", "user file nested", "user dotfile", "user folder named like a build folder"]
COMMANDS = ["train", "merge", "export", "quickstart base"]


@pytest.mark.slow  # one real run of each command first (train, merge, export through llama.cpp's converter, a base)
@pytest.mark.parametrize("flags", [[], ["overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", COMMANDS)
def test_a_command_refuses_a_folder_with_the_users_entries_and_deletes_nothing(
    name: str, case: str, flags: list[str], world, earlier, tmp_path: Path, capsys
) -> None:
    command = commands(world)[name]
    output = tmp_path / "out"
    shutil.copytree(earlier[name], output, symlinks=True)
    plant(case, output, command)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = command.run(output, [command.overwrite_flag] if flags else [])
    err = capsys.readouterr().err.strip()
    if case == "user folder named like a build folder" and not command.inside:
        # Beside the output (merge's .NAME.merge-abc123): the command may replace its own earlier output, and the
        # user's folder of that name stays, untouched.
        assert code == (0 if flags or command.keeps_without_flag else 2), err
        assert snapshot(tmp_path / command.build_like.format(name="out")) == {"backup.bin": b"the user's backup"}
        return
    if command.keeps_without_flag and not flags:
        assert code == 0, err  # the existing base is kept as it is, with whatever else is there
    else:
        assert code == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "nothing was deleted" in err or "already holds a run" in err, err
    assert snapshot(tmp_path) == before, "nothing in the folder or beside it changed"


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_with_nothing_else_there_the_earlier_output_is_replaced(name: str, world, earlier, tmp_path: Path) -> None:
    """The control: the same folder, without the user's entry, is replaced with --overwrite (so the refusals above
    come from the user's entry, not from the folder)."""
    command = commands(world)[name]
    output = tmp_path / "out"
    shutil.copytree(earlier[name], output, symlinks=True)
    assert command.run(output, [command.overwrite_flag]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.") and not p.name.endswith(".lock")]


@pytest.mark.slow
def test_the_folder_a_command_reads_is_never_its_output(world, tmp_path: Path, capsys) -> None:
    """The source folder itself as the output: refused in one line by every command, with or without --overwrite."""
    run, model = world["run"], world["model"]
    sequential = tmp_path / "sequential.yaml"  # continue the run's adapter, writing into the run itself
    text = world["recipe"].read_text()
    sequential.write_text(
        text.replace("adapter:\n  r: 4\n  alpha: 8\n  dropout: 0.1\n", f"adapter:\n  init_from: {run}\n")
    )
    assert f"output_dir: {run}\n" in text and "init_from" in sequential.read_text()
    attempts = {
        "train into the run it continues": ["train", str(sequential)],
        "train into its base model": ["train", str(world["recipe"]), f"output_dir={world['base']}"],
        "merge into the run": ["merge", str(run), "--output", str(run)],
        "merge into the adapter": ["merge", str(run), "--output", str(run / "adapter")],
        "merge into the base": ["merge", str(run), "--output", str(world["base"])],
        "export into the run": ["export", str(run), "--output", str(run)],
        "export into the model folder": ["export", str(model), "--output", str(model)],
    }
    before = {path: snapshot(path) for path in (run, model, world["base"])}
    for what, argv in attempts.items():
        for flags in ([], ["--overwrite"]):
            capsys.readouterr()
            assert main([*argv, *flags]) == 2, what
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "Traceback" not in err, (what, err)
    assert {path: snapshot(path) for path in (run, model, world["base"])} == before


@pytest.mark.slow
def test_eval_writes_only_its_report_files_and_refuses_a_folder_in_their_place(world, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run, symlinks=True)
    (run / "notes.txt").write_text("mine")
    (run / "sub").mkdir()
    (run / "sub" / "photo.jpg").write_bytes(b"\xff\xd8")
    (run / ".env").write_text("X=1\n")
    data = write_jsonl(tmp_path / "held-out.jsonl", fruit_rows(4, "alpaca"))
    assert main(["eval", str(run), "--data", str(data), "--no-base", "--max-new-tokens", "2"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "sub" / "photo.jpg").read_bytes() == b"\xff\xd8"
    assert (run / ".env").read_text() == "X=1\n" and (run / "eval.md").is_file()
    (run / "eval.md").unlink()
    (run / "eval.md").mkdir()  # a folder of the user's where eval writes its report
    (run / "eval.md" / "draft.txt").write_text("my draft")
    before = snapshot(run)
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--no-base", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is in the way" in err, err
    assert snapshot(run) == before


def test_check_json_replaces_only_a_report_check_wrote(world, tmp_path: Path, capsys) -> None:
    report = tmp_path / "report.json"
    report.write_text('{"my": "own file"}')
    argv = ["check", str(world["recipe"]), "--json", str(report)]
    assert main(argv) == 2
    assert "is not a report lora-tune wrote" in capsys.readouterr().err
    assert report.read_text() == '{"my": "own file"}'
    report.unlink()
    first = main(argv)
    written = json.loads(report.read_text())
    assert written["written_by"] == "lora-tune check" and "checks" in written
    report.write_text(json.dumps({**written, "checks": []}))  # an earlier report of check's: replaced
    assert main(argv) == first and json.loads(report.read_text()) == written


@pytest.mark.slow
def test_written_files_and_folders_follow_the_umask(world, tmp_path: Path) -> None:
    """What merge and export write is readable by another account under the usual umask 022, as save_pretrained
    writes it, and private under 077: mkstemp's 0600 and mkdtemp's 0700 never reach the results."""
    commands_ = commands(world)
    for mask, expect_dir, expect_file in ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600)):
        previous = os.umask(mask)
        try:
            merged, exported = tmp_path / f"merged-{mask:o}", tmp_path / f"gguf-{mask:o}"
            assert commands_["merge"].run(merged, []) == 0
            assert commands_["export"].run(exported, []) == 0
        finally:
            os.umask(previous)
        for folder in (merged, exported):
            assert stat.S_IMODE(folder.stat().st_mode) == expect_dir, folder
            for path in folder.iterdir():
                if path.is_file():
                    assert stat.S_IMODE(path.stat().st_mode) == expect_file, (path, oct(path.stat().st_mode))


@pytest.mark.slow
def test_export_into_a_project_with_its_own_readme_and_modelfile_replaces_neither(world, tmp_path: Path, capsys):
    """The review's case: `export --output proj`, where proj holds the user's README.md and Modelfile."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    (project / "Modelfile").write_text("FROM ./my-own.gguf\n")
    for flags in ([], ["--overwrite"]):
        assert commands(world)["export"].run(project, flags) == 2
        assert "holds no lora-tune GGUF export folder (Modelfile, README.md)" in capsys.readouterr().err
    assert snapshot(project) == {"README.md": b"# my project\n", "Modelfile": b"FROM ./my-own.gguf\n"}


@pytest.mark.slow
def test_export_checks_its_record_and_the_gguf_name_before_any_work(world, earlier, tmp_path: Path, capsys):
    """A foreign export.json (a JSON list) and a folder where the .gguf goes are refused before the conversion,
    not after it (the record used to fail with a TypeError once the file was written)."""
    export = commands(world)["export"]
    output = tmp_path / "out"
    shutil.copytree(earlier["export"], output, symlinks=True)
    (output / "export.json").write_text("[1, 2]")
    before = snapshot(output)
    assert export.run(output, ["--overwrite"]) == 2
    assert "export.json: expected the record lora-tune exports write, got a JSON list" in capsys.readouterr().err
    assert snapshot(output) == before
    shutil.rmtree(output)
    shutil.copytree(earlier["export"], output, symlinks=True)
    target = next(output.glob("*.gguf"))
    target.unlink()
    target.mkdir()  # a folder where the .gguf of this quant goes (its name is listed: an earlier export wrote it)
    before = snapshot(output)
    assert export.run(output, ["--overwrite"]) == 2
    assert "is in the way" in capsys.readouterr().err
    assert snapshot(output) == before
