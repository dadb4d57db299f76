"""What is served is decided by the path alone; the decoding a request gets over the model's defaults; the
command's one-line errors for a bad path or flag."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.recipe.schema import EvalConfig
from lora_tune.serve.backend import Decoding, ServeError, decoding, model_kind
from lora_tune.serve.gguf_backend import import_llama_cpp
from lora_tune.serve.protocol import Sampling


def test_the_kind_of_model_comes_from_the_path(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("{}")
    assert model_kind(tmp_path / "m.gguf") == "gguf"
    assert model_kind(tmp_path / "merged") == "folder"
    assert model_kind(tmp_path / "run") == "run"


@pytest.mark.parametrize(
    ("name", "message"), [("missing", "no such file"), ("notes.txt", "not a .gguf"), ("empty", "neither")]
)
def test_a_path_that_cannot_be_served_is_one_line(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match=message):
        model_kind(tmp_path / name)


def test_the_request_decides_decoding_and_the_model_fills_in_the_rest() -> None:
    greedy, sampled = EvalConfig(), EvalConfig(do_sample=True, temperature=0.7, top_p=0.9)
    assert decoding(Sampling(max_tokens=1), greedy) == Decoding(False, 1.0, 1.0)
    assert decoding(Sampling(max_tokens=1), sampled) == Decoding(True, 0.7, 0.9)
    assert decoding(Sampling(max_tokens=1, temperature=0.0), sampled).sample is False
    assert decoding(Sampling(max_tokens=1, temperature=1.3, top_p=0.5), greedy) == Decoding(True, 1.3, 0.5)


def test_without_llama_cpp_a_gguf_needs_one_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(ServeError, match=r"pip install 'lora-tune\[llama-cpp\]'.*make llama-cpp"):
        import_llama_cpp()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing"], "no such file or directory"),
        (["{tmp}/notes.txt"], "not a .gguf file"),
        (["{tmp}", "--port", "70000"], "--port: expected a port"),
        (["{tmp}", "--max-tokens-limit", "0"], "--max-tokens-limit"),
    ],
)
def test_bad_serve_arguments_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert main(["serve", *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_key_given_on_the_command_line_is_masked_in_what_is_printed(tmp_path, monkeypatch, capsys) -> None:
    import lora_tune.serve.start as start
    from lora_tune.serve.backend import ServeError

    key = "sekrit-serve-key-0123456789"
    (tmp_path / "config.json").write_text("{}")

    def failing_backend(path):  # noqa: ANN001, ANN202 - stands in for loading weights
        raise ServeError(f"could not load {path} for key {key}")

    monkeypatch.setenv("LORA_TUNE_API_KEY", "")  # recorded, so the value the command sets is undone after
    monkeypatch.setattr(start, "open_backend", failing_backend)
    assert main(["serve", str(tmp_path), "--api-key", key]) == 2
    out = capsys.readouterr()
    assert key not in out.out + out.err and "hf_***" in out.err


def _no_loading(path, **kwargs):  # noqa: ANN001, ANN003, ANN202 - stands in for reading weights
    raise AssertionError("the weights were read before the address was checked")


@pytest.mark.parametrize("host", ["busy", "192.0.2.1"])  # a port in use; an address not on this machine
def test_an_address_that_cannot_be_bound_is_one_line_before_loading(tmp_path, monkeypatch, capsys, host) -> None:
    import socket

    import lora_tune.serve.start as start

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(start, "open_backend", _no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = ["--port", str(port)] + (["--host", host] if host != "busy" else [])
        assert main(["serve", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    where = f"{'127.0.0.1' if host == 'busy' else host}:{port}"
    assert f"cannot listen on {where}" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_key_no_client_can_send_is_refused_and_a_short_one_warned(tmp_path, monkeypatch, capsys) -> None:
    import lora_tune.serve.start as start

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(start, "open_backend", _no_loading)
    monkeypatch.setenv("LORA_TUNE_API_KEY", "")
    assert main(["serve", str(tmp_path), "--api-key", "clé-secrète-123456"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "printable ASCII" in err and err.count("\n") == 1

    def loaded(path, **kwargs):  # noqa: ANN001, ANN003, ANN202
        raise ServeError("stop here")

    monkeypatch.setattr(start, "open_backend", loaded)
    assert main(["serve", str(tmp_path), "--api-key", "abc123", "--port", "0"]) == 2
    out = capsys.readouterr()
    assert "the API key is 6 characters" in out.out + out.err
