"""The command line: lazy imports, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_tune.cli import main

RECIPE = "model:\n  name: some/model\nquantization:\n  bits: 4\ndatasets:\n  - path: {data}\noutput_dir: {out}\n"


@pytest.fixture
def recipe(tmp_path: Path, alpaca_file: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(data=alpaca_file, out=tmp_path / "run"))
    return path


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_help_and_validate_do_not_import_torch(recipe):
    code = (
        "import sys\nfrom lora_tune.cli import main\n"
        f"assert main(['validate', {str(recipe)!r}]) == 0\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_validate_ok(recipe, capsys):
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "QLoRA (4-bit nf4)" in out


def test_validate_prints_resolved_recipe(recipe, capsys):
    assert main(["validate", str(recipe), "training.max_steps=3", "--print"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out


def test_bad_recipe_is_one_line_exit_2(recipe, capsys):
    assert main(["validate", str(recipe), "adapter.rank=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: command line: adapter.rank: unknown key 'rank'")


def test_debug_shows_the_traceback(recipe):
    with pytest.raises(Exception, match="unknown key"):
        main(["--debug", "validate", str(recipe), "adapter.rank=4"])


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tune", "validate", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "YAML syntax error" in proc.stderr and "bad.yaml:" in proc.stderr


def test_train_refuses_a_foreign_non_empty_output_dir(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["train", str(recipe)]) == 2
    assert "holds no lora-tune run" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_console_log_lines_are_short():
    from lora_tune.training.log import format_log_line

    line = format_log_line({"loss": 0.54321, "learning_rate": 2.8e-3, "grad_norm": 0.0864, "epoch": 1.2}, 10, 125)
    assert line == "  train step 10/125  loss 0.5432  lr 2.80e-03  grad norm 0.086"
    expected = "  eval  step 25/125: loss 0.0374  perplexity 1.04"  # exp(0.0374) = 1.0381
    assert format_log_line({"eval_loss": 0.0374, "eval_runtime": 0.1}, 25, 125) == expected
    assert format_log_line({"train_runtime": 31.7, "train_loss": 0.41}, 125, 125) is None


def test_overrides_may_follow_flags(recipe, capsys):
    assert main(["validate", str(recipe), "--print", "training.max_steps=3", "adapter.r=4"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "r: 4" in out
    with pytest.raises(SystemExit):
        main(["validate", str(recipe), "--bogus"])


def test_a_closed_pipe_stops_quietly():
    """`lora-tune recipes NAME | head -1`: no error line, no traceback, SIGPIPE's exit status."""
    command = [sys.executable, "-m", "lora_tune.cli", "recipes", "gemma/gemma-2-2b-it-lora-chat"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader goes away before the first line is written
    stderr = process.stderr.read().decode()
    assert process.wait() == 141
    assert stderr == ""


@pytest.mark.parametrize(
    ("path", "secret"),
    [
        ("data/hf_abcdefghijklmnopqrstuvwxyz12_train.jsonl", "hf_abcdefghijklmnopqrstuvwxyz12"),  # inside a name
        ("https://alice:PA55word-secret@example.org/train.jsonl", "PA55word-secret"),
        ("keys/sk-abcdefghijklmnopqrstuvwx.jsonl", "sk-abcdefghijklmnopqrstuvwx"),
    ],
)
def test_error_lines_mask_credential_shaped_values(recipe, capsys, path, secret):
    assert main(["validate", str(recipe), f"datasets.0.path={path}"]) == 2
    err = capsys.readouterr().err
    assert secret not in err and "***" in err, err
