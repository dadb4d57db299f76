"""A run's or a model folder's file cut short, emptied or broken: `merge`, `export`, `serve` and `generate` say which
file in one line, exit 2, before any weights are loaded (lora_tune.model.weights: read_json, safetensors_header)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.helpers import lora, make_run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])  # a copy that stopped early


def empty(path: Path) -> None:
    path.write_bytes(b"")


def break_json(path: Path) -> None:
    path.write_text(path.read_text()[:20])


DAMAGES: dict[str, Callable[[Path], None]] = {"truncated": truncate, "empty": empty, "broken": break_json}


@pytest.fixture(scope="module")
def sound(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run and the folder it merges into, both whole; each test breaks a copy."""
    from lora_tune.export import merge

    root = tmp_path_factory.mktemp("sound")
    run = make_run(root, tiny_model_dir, lora())
    merge(run, root / "merged", verify=False)
    return run, root / "merged"


def damaged_copy(source: Path, tmp_path: Path, name: str, damage: str) -> tuple[Path, Path]:
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    recipe = copy / "recipe.yaml"
    if recipe.is_file():  # the run names its own folder as output_dir
        recipe.write_text(recipe.read_text().replace(str(source), str(copy)))
    DAMAGES[damage](copy / name)
    return copy, copy / name


def one_line_naming(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    return err


ADAPTER_CASES = [
    ("adapter/adapter_model.safetensors", "truncated", "truncated: its header describes"),
    ("adapter/adapter_model.safetensors", "empty", "the file is empty; expected safetensors weights"),
    ("adapter/adapter_config.json", "broken", "not valid JSON at line "),
    ("adapter/adapter_config.json", "empty", "the file is empty; expected a JSON object"),
]


@pytest.mark.parametrize("verb", ["merge", "export", "serve", "generate"])
@pytest.mark.parametrize(("name", "damage", "says"), ADAPTER_CASES)
def test_a_broken_file_of_the_run_is_named(sound, tmp_path: Path, capsys, verb, name, damage, says):
    run, path = damaged_copy(sound[0], tmp_path, name, damage)
    argv = {
        "merge": ["merge", str(run), "--output", str(tmp_path / "out")],
        "export": ["export", str(run), "--output", str(tmp_path / "gguf"), "--quant", "f16"],
        "serve": ["serve", str(run), "--port", "0"],
        "generate": ["generate", str(run), "hello"],
    }[verb]
    assert main(argv) == 2
    assert says in one_line_naming(capsys, path)
    assert not (tmp_path / "out").exists()


MERGED_CASES = [
    ("model.safetensors", "truncated", "truncated: its header describes"),
    ("config.json", "broken", "not valid JSON at line "),
    ("config.json", "empty", "the file is empty; expected a JSON object"),
]


@pytest.mark.parametrize(
    "verb",
    [
        "serve",
        "generate",
        "export",
    ],
)
@pytest.mark.parametrize(("name", "damage", "says"), MERGED_CASES)
def test_a_broken_file_of_a_merged_folder_is_named(sound, tmp_path: Path, capsys, verb, name, damage, says):
    folder, path = damaged_copy(sound[1], tmp_path, name, damage)
    argv = {
        "serve": ["serve", str(folder), "--port", "0"],
        "generate": ["generate", str(folder), "hello"],
        "export": ["export", str(folder), "--output", str(tmp_path / "gguf"), "--quant", "f16"],
    }[verb]
    assert main(argv) == 2
    assert says in one_line_naming(capsys, path)


def test_a_broken_file_of_a_local_base_is_named_before_it_loads(sound, tiny_model_dir: Path, tmp_path: Path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    truncate(base / "model.safetensors")
    run = tmp_path / "run"
    shutil.copytree(sound[0], run)
    (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text().replace(str(tiny_model_dir), str(base)))
    assert main(["merge", str(run), "--output", str(tmp_path / "out")]) == 2
    one_line_naming(capsys, base / "model.safetensors")
    assert main(["generate", str(run), "hello"]) == 2
    one_line_naming(capsys, base / "model.safetensors")


def safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (safetensors_bytes(b"[1, 2, 3]"), "not a safetensors file (its header is not a JSON object)"),
        (b"\xff" * 8 + b"{}", "not a safetensors file, or cut short (10 bytes; no complete header)"),
        (safetensors_bytes(b"{}", b"\0" * 4), "longer than its header says"),
        (safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}'), "tensor 'w' has no valid"),
    ],
)
def test_safetensors_header_names_what_is_wrong(tmp_path: Path, content: bytes, says: str):
    from lora_tune.model.weights import WeightsError, safetensors_header

    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="x.safetensors: ") as caught:
        safetensors_header(path)
    assert says in str(caught.value)


def test_safetensors_header_reads_a_whole_file(sound):
    from safetensors import safe_open

    from lora_tune.model.weights import safetensors_header

    path = sound[0] / "adapter" / "adapter_model.safetensors"
    header, start = safetensors_header(path)
    with safe_open(path, "pt") as handle:
        assert sorted(header) == sorted(handle.keys())
    assert start > 8
