"""`lora-tune push` hardening: timeouts against a silent loopback hub, exit codes, and an upload list that never
follows a symlink or carries a hidden file. No torch, no network beyond 127.0.0.1; each test takes about a second.
"""

from __future__ import annotations

import importlib
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.helpers import TIMEOUT_ENV, TOKEN, adapter_run, model_folder, plant_hazards, run_bounded

push_module = importlib.import_module("lora_tune.export.push")  # the package's `push` shadows the module name


def listed_and_skipped(out: str) -> tuple[set[str], dict[str, str]]:
    """From `format_push` output: the listed file paths, and {skipped path: reason}."""
    listed = {m.group(1) for m in re.finditer(r"^  (\S+)  \d", out, re.M)}
    skipped = {m.group(1): m.group(2) for m in re.finditer(r"^  skipped (\S+) \((.+)\)$", out, re.M)}
    return listed, skipped


def test_merged_push_lists_regular_files_only_and_names_what_it_skipped(tmp_path: Path, capsys):
    folder = model_folder(tmp_path)
    hazards = plant_hazards(folder, tmp_path / "outside")
    assert main(["push", str(folder), "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed, skipped = listed_and_skipped(out)
    assert listed == {"README.md", "config.json", "model.safetensors", "tokenizer/tokenizer.json"}
    assert set(skipped) == set(hazards)
    assert skipped["key.txt"] == skipped["home"] == "symlink, not followed"
    assert skipped[".env"] == skipped[".git/"] == "hidden"
    assert "todo.txt" not in out and "id_rsa" not in out


def test_adapter_push_lists_regular_files_only_and_names_what_it_skipped(tmp_path: Path, capsys):
    run = adapter_run(tmp_path)
    hazards = plant_hazards(run / "adapter", tmp_path / "outside")
    (run / "adapter" / "checkpoint-3").mkdir()  # an adapter is pushed flat
    assert main(["push", str(run), "me/x", "--dry-run"]) == 0
    listed, skipped = listed_and_skipped(capsys.readouterr().out)
    assert listed == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert set(skipped) == {f"adapter/{name}" for name in [*hazards, "checkpoint-3/"]}


def test_a_linked_shard_does_not_make_a_model_folder(tmp_path: Path, capsys):
    folder = tmp_path / "looks-merged"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"\0")
    (folder / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert main(["push", str(folder), "me/x", "--dry-run"]) == 2
    assert "neither a lora-tune run directory" in capsys.readouterr().err


@pytest.fixture
def silent_hub(online) -> Iterator[tuple[str, list[socket.socket], list[float]]]:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte; HF_ENDPOINT points at it."""
    point_at, sleeps = online
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        for _ in range(1200):  # 60 s at most, whatever happens to the test
            if stop.is_set():
                return
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    point_at(url)
    yield url, accepted, sleeps
    stop.set()
    thread.join(timeout=2)
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_silent_hub_times_out_with_one_line_and_exit_1(silent_hub, tmp_path: Path, capsys, monkeypatch, how):
    from huggingface_hub.utils import _http

    url, accepted, sleeps = silent_hub
    factory = _http._GLOBAL_CLIENT_FACTORY
    argv = ["push", str(model_folder(tmp_path)), "me/x"]
    if how == "flag":
        argv += ["--timeout", "0.2"]
    else:
        monkeypatch.setenv(TIMEOUT_ENV, "0.2")  # the way to reach `merge --push-to-hub`
    rc, seconds = run_bounded(argv)
    assert rc == 1, "a push to a hub that never answers must end, with exit 1"
    assert seconds < 3, "3 tries of 0.2 s, backoff sleeps stubbed"
    assert len(accepted) == push_module.ATTEMPTS and sleeps == [2.0, 4.0]
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("error: ") == 1, "the retries' log lines, then one error line"
    err = err.splitlines()[-1]
    assert f"the hub at {url} did not answer within 0.2 s (3 tries, " in err and " s in all)" in err
    assert "HF_ENDPOINT" in err and "--timeout" in err
    assert TOKEN not in captured.out + captured.err
    assert _http._GLOBAL_CLIENT_FACTORY is factory, "the client factory is put back after the push"


def test_unreachable_hub_fails_with_exit_1_after_the_tries(online, tmp_path: Path, capsys):
    point_at, sleeps = online
    closed = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now: connection refused
    point_at(url)
    rc, _ = run_bounded(["push", str(model_folder(tmp_path)), "me/x"])
    assert rc == 1 and sleeps == [2.0, 4.0]
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("error: ") == 1 and f"cannot reach the hub at {url} (3 tries, " in err.splitlines()[-1]
    assert TOKEN not in captured.out + captured.err


@pytest.mark.parametrize("repo_id", ["me/a..b", "me/-x", "me/x--y"])
def test_repo_id_the_hub_would_refuse_fails_before_anything_with_exit_2(tmp_path: Path, capsys, repo_id):
    assert main(["push", str(model_folder(tmp_path)), repo_id, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: repo id:") and repo_id in err


@pytest.mark.parametrize(("argv", "env"), [(["--timeout", "0"], None), (["--timeout", "nan"], None), ([], "soon")])
def test_bad_timeout_is_a_user_error(tmp_path: Path, capsys, monkeypatch, argv, env):
    if env is not None:
        monkeypatch.setenv(TIMEOUT_ENV, env)
    assert main(["push", str(model_folder(tmp_path)), "me/x", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected a number of seconds > 0" in err


def test_merge_push_to_hub_checks_the_repo_id_before_merging(tmp_path: Path, capsys):
    """`merge --push-to-hub me/a..b` used to merge for minutes and then fail at the push."""
    assert (
        main(["merge", str(tmp_path / "no-run"), "--output", str(tmp_path / "out"), "--push-to-hub", "me/a..b"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: repo id:") and not (tmp_path / "out").exists()


# Names are shown escaped: a name cannot add a line of its own to the listing a user checks before uploading.


def test_a_name_with_a_line_break_cannot_fake_a_line_of_the_listing(tmp_path: Path, capsys):
    folder = model_folder(tmp_path)
    forged = "notes.txt\n  skipped model.safetensors (hidden)"
    (folder / forged).write_text("x")
    (folder / "bell\x07\x1b[2J.txt").write_text("x")  # a terminal's escape sequence: clears the screen
    assert main(["push", str(folder), "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed, skipped = listed_and_skipped(out)
    assert skipped == {} and "model.safetensors" in listed
    assert "  notes.txt\\n  skipped model.safetensors (hidden)  1 B" in out.splitlines()
    assert "  bell\\x07\\x1b[2J.txt  1 B" in out.splitlines() and "\x1b" not in out
    assert len(out.splitlines()) == 8  # title, 4 files, the 2 planted ones, commit message


def test_a_name_that_holds_a_credential_is_not_uploaded(tmp_path: Path, capsys):
    folder = model_folder(tmp_path)
    (folder / f"notes-{TOKEN}.txt").write_text("x")
    assert main(["push", str(folder), "me/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  skipped notes-hf_***.txt (its name holds a credential)" in out.splitlines() and TOKEN not in out


# A folder push cannot read is one line naming it, exit 2 (as root, permissions are simulated where they cannot be
# real).


def test_an_unreadable_sub_folder_is_one_line_naming_it(tmp_path: Path, capsys, monkeypatch):
    import os

    folder = model_folder(tmp_path)
    locked = folder / "tokenizer"
    real_scandir = os.scandir

    def scandir(path):  # noqa: ANN001, ANN202 - os.scandir's signature
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(push_module.os, "scandir", scandir)
    assert main(["push", str(folder), "me/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: {locked}: cannot read this folder (Permission denied); fix its permissions, or move it "
        "out of the folder you push\n"
    )


def test_a_folder_even_root_may_not_read_is_one_line(capsys):
    """/proc/1/fdinfo refuses root too where the process lacks CAP_SYS_PTRACE over pid 1 (containers)."""
    import os

    try:
        os.scandir("/proc/1/fdinfo").close()
        pytest.skip("/proc/1/fdinfo is readable here")
    except PermissionError:
        pass
    except OSError:
        pytest.skip("no /proc/1/fdinfo here")
    assert main(["push", "/proc/1/fdinfo", "me/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: /proc/1/fdinfo: cannot read this folder (Permission denied)") and err.count("\n") == 1
    )


def test_the_root_folder_is_refused_without_walking_it(capsys):
    rc, seconds = run_bounded(["push", "/", "me/x", "--dry-run"], limit_s=10)
    assert rc == 2 and seconds < 10
    err = capsys.readouterr().err
    assert err.startswith("error: /: neither a lora-tune run directory") and err.count("\n") == 1
