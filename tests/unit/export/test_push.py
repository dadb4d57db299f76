"""`lora-tune push` against a loopback hub: http.server answering the endpoints huggingface_hub 2.4 calls."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.helpers import adapter_run, lora, make_run, model_folder, plant_hazards, run_bounded


class FakeHub(BaseHTTPRequestHandler):
    """create_repo (POST /api/repos/create), preupload (every file 'regular'), commit (NDJSON, base64 files)."""

    requests: list[tuple[str, str]] = []
    repos: dict[str, dict] = {}
    commits: list[dict] = []
    failures: dict[str, list[int]] = {}  # endpoint kind (see `kinds`) -> statuses to answer first, in order
    stalled: set[str] = set()  # endpoint kinds that get no answer until the test ends
    kinds = {"create": "/api/repos/create", "preupload": "/preupload/", "commit": "/commit/"}  # kind -> path part
    release = threading.Event()

    def log_message(self, *args) -> None:  # noqa: ANN002 - keep the test output clean
        pass

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        self.requests.append(("POST", path))
        kind = next((kind for kind, part in self.kinds.items() if part in path), None)
        if kind in self.stalled:
            self.release.wait(timeout=30)  # silent, then let the connection go; bounded if teardown never comes
            return None
        if kind and self.failures.get(kind):
            status = self.failures[kind].pop(0)
            return self._reply(status, {"error": f"fake hub answers {status}"})
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            exists = repo_id in self.repos
            self.repos.setdefault(repo_id, {"visibility": payload.get("visibility")})
            return self._reply(409 if exists else 200, {"url": f"{self.base}/{repo_id}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._reply(200, {"files": modes})
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files = {
                item["value"]["path"]: base64.b64decode(item["value"]["content"])
                for item in lines
                if item["key"] == "file"
            }
            assert not [item for item in lines if item["key"] == "lfsFile"]
            self.commits.append({"path": path, "summary": header["summary"], "files": files})
            repo_id, oid = path.removeprefix("/api/models/").split("/commit/")[0], "a" * 40
            return self._reply(200, {"commitUrl": f"{self.base}/{repo_id}/commit/{oid}", "commitOid": oid})
        return self._reply(404, {"error": f"unexpected {path}"})


def visible(folder: Path) -> list[Path]:
    """What push uploads of a merged folder: not the hidden names (merge's own marker among them)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


@pytest.fixture
def hub(monkeypatch):
    import importlib

    import huggingface_hub.constants

    push_module = importlib.import_module("lora_tune.export.push")  # the package's `push` shadows the module name

    FakeHub.requests, FakeHub.repos, FakeHub.commits, FakeHub.failures = [], {}, [], {}
    FakeHub.stalled, FakeHub.release = set(), threading.Event()
    FakeHub.sleeps = []
    monkeypatch.setattr(push_module, "sleep", FakeHub.sleeps.append)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    # The suite runs offline; this test's only "hub" is the loopback server. ENDPOINT is read at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    yield FakeHub
    FakeHub.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def merged_and_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from lora_tune.export import merge

    root = tmp_path_factory.mktemp("push")
    run = make_run(root, tiny_model_dir, lora())
    merge(run, root / "merged", dtype="bf16", verify=False)
    return root / "merged", run


def test_push_merged_folder_delivers_every_file_byte_identical(hub, merged_and_run, capsys):
    merged, run = merged_and_run
    assert main(["push", str(merged), "me/tiny-merged", "--private"]) == 0
    assert hub.repos == {"me/tiny-merged": {"visibility": "private"}}
    assert len(hub.commits) == 1, "one commit"
    commit = hub.commits[0]
    assert commit["path"] == "/api/models/me/tiny-merged/commit/main"
    local = {p.name: p.read_bytes() for p in visible(merged)}
    assert set(commit["files"]) == set(local) and "README.md" in local
    for name, data in local.items():
        assert commit["files"][name] == data, name
    assert commit["summary"] == f"Upload merged model of lora-tune run '{run.name}'"
    out = capsys.readouterr().out
    assert "Uploaded merged model" in out and "hf_fake_token" not in out


def test_push_run_dir_sends_adapter_and_model_card(hub, merged_and_run):
    _, run = merged_and_run
    assert main(["push", str(run), "me/tiny-adapter", "--message", "first adapter"]) == 0
    assert main(["push", str(run), "me/tiny-adapter"]) == 0, "an existing repo is fine (exist_ok)"
    commit = hub.commits[0]
    assert commit["summary"] == "first adapter" and "run" in hub.commits[1]["summary"]
    adapter_files = {p.name for p in (run / "adapter").iterdir()} - {"README.md"}
    assert set(commit["files"]) == adapter_files | {"README.md"}
    for name in adapter_files:
        assert commit["files"][name] == (run / "adapter" / name).read_bytes(), name
    card = commit["files"]["README.md"].decode()
    assert "library_name: peft" in card and "base_model:" in card


def test_dry_run_lists_files_and_sends_nothing(hub, merged_and_run, capsys):
    merged, _ = merged_and_run
    assert main(["push", str(merged), "me/tiny-merged", "--dry-run"]) == 0
    assert hub.requests == []
    out = capsys.readouterr().out
    assert "Would upload merged model" in out
    for path in visible(merged):
        assert path.name in out


def test_a_gguf_export_folder_is_pushed_whole(hub, tmp_path: Path, capsys):
    (tmp_path / "x-Q8_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    for name in ("Modelfile", "README.md", "export.json"):
        (tmp_path / name).write_text(name)
    (tmp_path / ".export.lock").write_text("")
    assert main(["push", str(tmp_path), "me/x-GGUF", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Would upload GGUF files" in out and "x-Q8_0.gguf" in out and "Modelfile" in out
    assert "skipped .export.lock (hidden)" in out and hub.requests == []


def test_push_refuses_a_folder_that_is_neither_run_nor_model(tmp_path: Path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["push", str(tmp_path), "me/x", "--dry-run"]) == 2
    assert "neither a lora-tune run directory" in capsys.readouterr().err


def test_transient_hub_error_is_retried_with_backoff(hub, merged_and_run, capsys):
    merged, _ = merged_and_run
    hub.failures = {"commit": [503]}
    assert main(["push", str(merged), "me/tiny-retry"]) == 0
    commit_posts = [path for method, path in hub.requests if "/commit/" in path]
    assert len(commit_posts) == 2, "one failed attempt, one retry"
    assert len(hub.commits) == 1 and set(hub.commits[0]["files"]) == {p.name for p in visible(merged)}
    assert hub.sleeps == [2.0]
    captured = capsys.readouterr()
    assert "Uploaded merged model" in captured.out
    assert "commit failed (HTTP 503), retrying in 2s (attempt 2/3)" in captured.err, "a log line: on stderr"


def test_persistent_5xx_gives_up_after_the_attempts(hub, merged_and_run, capsys):
    merged, _ = merged_and_run
    hub.failures = {"create": [502, 502, 502]}
    assert main(["push", str(merged), "me/tiny-down"]) == 1, "the hub's trouble, not the user's: exit 1"
    assert hub.sleeps == [2.0, 4.0] and hub.commits == []
    err = capsys.readouterr().err.strip()
    assert err.count("error: ") == 1 and "HTTP 502 after 3 tries (" in err.splitlines()[-1]


@pytest.mark.parametrize(("status", "code"), [(401, 2), (403, 2), (404, 1), (422, 1)])
def test_client_errors_fail_at_once_without_the_token(hub, merged_and_run, capsys, status, code):
    """401/403: the token is missing, wrong or may not write there (the user's to fix, 2); other refusals: 1."""
    merged, _ = merged_and_run
    hub.failures = {"commit": [status]}
    assert main(["push", str(merged), "me/tiny-denied"]) == code
    assert [path for _, path in hub.requests if "/commit/" in path] == ["/api/models/me/tiny-denied/commit/main"]
    assert hub.sleeps == [] and hub.commits == []
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and f"HTTP {status}" in err
    assert "hf_fake_token" not in captured.err + captured.out
    if status == 401:
        assert "hf auth login" in err


def test_commit_carries_only_regular_files_never_links_or_hidden_ones(hub, tmp_path: Path, capsys):
    merged, run = model_folder(tmp_path / "m"), adapter_run(tmp_path / "r")
    plant_hazards(merged, tmp_path / "outside-m")
    plant_hazards(run / "adapter", tmp_path / "outside-r")
    assert main(["push", str(merged), "me/m"]) == 0
    assert main(["push", str(run), "me/r"]) == 0
    merged_commit, adapter_commit = hub.commits
    assert set(merged_commit["files"]) == {"README.md", "config.json", "model.safetensors", "tokenizer/tokenizer.json"}
    assert set(adapter_commit["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    for commit in hub.commits:
        assert not any(b"PRIVATE KEY" in data or b"secret plans" in data for data in commit["files"].values())
    out = capsys.readouterr().out
    assert "skipped key.txt (symlink, not followed)" in out and "skipped adapter/.env (hidden)" in out


def test_missing_token_fails_before_any_request(hub, merged_and_run, capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    merged, _ = merged_and_run
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no saved login
    assert main(["push", str(merged), "me/tiny-anon"]) == 2
    assert hub.requests == [] and hub.repos == {}
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no hub token" in err and "hf auth login" in err


def test_hub_that_stalls_mid_commit_is_tried_3_times_in_all(hub, tmp_path: Path, capsys):
    """huggingface_hub retries a timed-out preupload 5 times itself; only our 3 tries may count (3 waits, not 18)."""
    hub.stalled = {"preupload"}
    rc, seconds = run_bounded(["push", str(model_folder(tmp_path)), "me/stalled", "--timeout", "0.2"])
    assert rc == 1 and seconds < 3
    assert [path for _, path in hub.requests if "/preupload/" in path] == ["/api/models/me/stalled/preupload/main"] * 3
    assert hub.sleeps == [2.0, 4.0] and hub.commits == []
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("error: ") == 1 and "did not answer within 0.2 s (3 tries, " in err.splitlines()[-1]
    assert "commit failed (no answer within 0.2 s), retrying in 2s (attempt 2/3)" in captured.err
    assert "hf_fake_token" not in captured.out + captured.err


def test_connection_error_is_retried(hub, merged_and_run, monkeypatch):
    import httpx2
    from huggingface_hub import HfApi

    merged, _ = merged_and_run
    real = HfApi.create_repo
    calls = []

    def flaky(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - HfApi.create_repo's signature
        calls.append(1)
        if len(calls) == 1:
            raise httpx2.ConnectError("connection refused")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", flaky)
    assert main(["push", str(merged), "me/tiny-flaky"]) == 0
    assert len(calls) == 2 and hub.sleeps == [2.0] and len(hub.commits) == 1


def test_merge_with_push_to_hub_uploads_the_verified_folder(hub, tiny_model_dir: Path, tmp_path: Path, capsys):
    run = make_run(tmp_path, tiny_model_dir, lora())
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(out), "--push-to-hub", "me/tiny-pushed", "--private"]) == 0
    assert hub.repos == {"me/tiny-pushed": {"visibility": "private"}}
    assert len(hub.commits) == 1
    local = {p.name: p.read_bytes() for p in visible(out)}
    assert hub.commits[0]["files"] == local and "README.md" in local
    out_text = capsys.readouterr().out
    assert "verified" in out_text and "Uploaded merged model" in out_text


def test_merge_push_needs_a_repo_for_private(tiny_model_dir: Path, tmp_path: Path, capsys):
    run = make_run(tmp_path, tiny_model_dir, lora())
    assert main(["merge", str(run), "--output", str(tmp_path / "merged"), "--private"]) == 2
    assert "--private needs --push-to-hub" in capsys.readouterr().err
    assert main(["merge", str(run), "--output", str(tmp_path / "merged"), "--push-to-hub", "not a repo"]) == 2
    assert "expected ORG/NAME" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists(), "checked before merging"


def test_failed_merge_pushes_nothing(hub, tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    from lora_tune.export.streaming import LoraUpdate

    run = make_run(tmp_path, tiny_model_dir, lora())
    real_delta = LoraUpdate.delta
    monkeypatch.setattr(LoraUpdate, "delta", lambda self, fan_in_fan_out: 3 * real_delta(self, fan_in_fan_out))
    assert main(["merge", str(run), "--output", str(tmp_path / "merged"), "--push-to-hub", "me/x"]) == 1
    assert hub.requests == []


# Every text file published is masked as the model card is; weights go as they are.

SECRET = "hf_SilentHubTestToken0123456789abcdefXYZ"
BASE = f"/models/{SECRET}/base"  # a base model path the user's token ended up in


@pytest.fixture
def with_secret_paths(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:  # noqa: ANN001
    """A merged folder whose lineage.json, and a run whose adapter_config.json, name the base by that path."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    merged, run = model_folder(tmp_path / "m"), adapter_run(tmp_path / "r")
    (merged / "lineage.json").write_text(json.dumps({"base_model": BASE, "parents": []}, separators=(",", ":")))
    (merged / "notes.txt").write_text(f"trained from https://alice:PA55word@example.org/{BASE}\n")
    (merged / "model.safetensors").write_bytes(b"\0" * 8 + SECRET.encode())  # binary: never rewritten
    config = {"peft_type": "LORA", "r": 4, "base_model_name_or_path": BASE}
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return merged, run


def test_text_files_are_uploaded_masked_and_weights_as_they_are(hub, with_secret_paths):
    merged, run = with_secret_paths
    assert main(["push", str(merged), "me/m"]) == 0
    assert main(["push", str(run), "me/r"]) == 0
    merged_files, adapter_files = (commit["files"] for commit in hub.commits)
    assert json.loads(merged_files["lineage.json"]) == {"base_model": "/models/hf_***/base", "parents": []}
    assert merged_files["notes.txt"] == b"trained from https://***@example.org//models/hf_***/base\n"
    assert merged_files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert json.loads(adapter_files["adapter_config.json"])["base_model_name_or_path"] == "/models/hf_***/base"
    assert merged_files["config.json"] == b"{}", "a file with nothing to mask goes byte for byte"
    for name, data in [*merged_files.items(), *adapter_files.items()]:
        if not name.endswith(".safetensors"):
            assert SECRET.encode() not in data and b"PA55word" not in data, name


def test_the_dry_run_says_which_files_were_masked(hub, with_secret_paths, capsys):
    merged, run = with_secret_paths
    assert main(["push", str(merged), "me/m", "--dry-run"]) == 0
    assert main(["push", str(run), "me/r", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    masked = sorted(line.split()[0] for line in lines if line.endswith("(credentials masked)"))
    assert masked == ["adapter_config.json", "lineage.json", "notes.txt"]
    assert hub.requests == []
