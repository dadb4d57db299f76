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


# Every line a command prints goes through `redact` (run_verb wraps stdout and stderr), not only error lines.

HF_SECRET = "hf_SilentHubTestToken0123456789abcdefXYZ"  # the value of HF_TOKEN in these tests
URL_SECRET = "https://alice:PA55word-secret@example.org/m"


def test_validate_masks_its_ok_line_and_the_resolved_recipe(recipe, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    assert main(["validate", str(recipe), f"model.name={HF_SECRET}/m"]) == 0
    assert main(["validate", str(recipe), f"model.name={URL_SECRET}", "--print"]) == 0
    out = capsys.readouterr().out
    assert HF_SECRET not in out and "PA55word" not in out, out
    assert "on hf_***/m;" in out and "https://***@example.org/m" in out


def test_the_first_line_of_train_is_masked(recipe, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("x")  # refused after the first line: no training needed
    assert main(["train", str(recipe), f"model.name={URL_SECRET}"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("lora-tune: ") and "https://***@example.org/m" in captured.out
    assert "PA55word" not in captured.out + captured.err


def test_streamed_generate_output_is_masked_even_in_pieces(capsys, monkeypatch):
    """A secret the model writes a few characters at a time, flushing after each, never reaches stdout whole."""
    import types

    import lora_tune.inference.chat as chat
    import lora_tune.inference.load as load

    def reply(loaded, messages, *, stream=None, settings=None):  # noqa: ANN001, ANN202 - chat.reply's signature
        for piece in ["the key is ", HF_SECRET[:6], HF_SECRET[6:20], HF_SECRET[20:], " and ", URL_SECRET[:12]]:
            stream.write(piece)
            stream.flush()
        stream.write(URL_SECRET[12:] + "\n")
        return ""

    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setattr(load, "load_for_inference", lambda path: types.SimpleNamespace(settings=None))
    monkeypatch.setattr(chat, "reply", reply)
    assert main(["generate", "some-run", "what is the key?"]) == 0
    assert capsys.readouterr().out == "the key is hf_*** and https://***@example.org/m\n"


# Log lines of a verb whose stdout is its result go to stderr: `answer=$(lora-tune generate ...)` is the answer.

LOG_LINE = "a log line, not part of the result"


def _logging(result: str):  # noqa: ANN202 - a stand-in for the function that makes the verb's result
    import logging

    def make(*args, **kwargs) -> str:  # noqa: ANN002, ANN003 - whatever the real one takes
        logging.getLogger("lora_tune.test").info(LOG_LINE)
        return result

    return make


@pytest.mark.parametrize(
    ("argv", "module", "name"),
    [
        (["validate", "{recipe}", "--print"], "lora_tune.recipe.load", "dump_resolved"),
        (["recipes"], "lora_tune.plan.catalog", "format_table"),
        (["new", "--model", "m", "--method", "lora", "--data", "d.jsonl"], "lora_tune.plan.new", "new_recipe"),
        (["push", "{folder}", "me/x", "--dry-run"], "lora_tune.export.push", "format_push"),
    ],
)
def test_result_verbs_log_to_stderr(recipe, tmp_path, capsys, monkeypatch, argv, module, name):
    import importlib

    from tests.helpers import model_folder

    monkeypatch.setattr(importlib.import_module(module), name, _logging("THE RESULT\n"))
    folder = model_folder(tmp_path)
    assert main([arg.format(recipe=recipe, folder=folder) for arg in argv]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "THE RESULT" and LOG_LINE in captured.err


def test_generate_prints_the_answer_alone_on_stdout(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The 4-bit kernel note (logged while loading a QLoRA run on an AVX512-BF16 CPU) goes to stderr."""
    import lora_tune.model.load as model_load
    from tests.helpers import lora, make_run

    run = make_run(tmp_path, tiny_model_dir, lora())
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("adapter:", "quantization:\n  bits: 4\nadapter:", 1))
    note = "4-bit: this CPU has AVX512-BF16, so bitsandbytes computes the 4-bit layers in bfloat16"
    monkeypatch.setattr(model_load, "inference_note", lambda model: note)  # what such a CPU logs
    assert main(["generate", str(run), "fruit number 1?", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert note in captured.err and note not in captured.out
    assert captured.out.count("\n") == 1, captured.out


# A library error names its parameter (`quant`); the command line names the flag that set it (`--quant`), read from
# argparse itself. A name the verb has no flag for (a recipe key such as output_dir) is printed as it is.
def test_an_option_error_is_said_with_the_verbs_flag(capsys):
    import argparse

    from lora_tune.cli import build_parser, run_verb
    from lora_tune.errors import OptionError

    args = build_parser().parse_args(["export", "some/run"])
    assert args.names["quant"] == "--quant" and args.names["merge_dtype"] == "--merge-dtype"
    for option, shown in (("quant", "--quant"), ("output_dir", "output_dir")):

        def refuse(_: argparse.Namespace, option: str = option) -> int:
            raise OptionError(option, "expected something else")

        assert run_verb(refuse, args) == 2
        assert capsys.readouterr().err == f"error: {shown}: expected something else\n"


def test_a_library_parameter_error_reads_as_the_flag_on_the_command_line(recipe, capsys):
    from lora_tune.plan.memory import parse_size

    with pytest.raises(Exception, match="^gpu_memory: expected a size"):
        parse_size("lots")
    assert main(["plan", str(recipe), "--gpu-memory", "lots"]) == 2
    assert capsys.readouterr().err == "error: --gpu-memory: expected a size such as 24GiB or 80GB, got 'lots'\n"
