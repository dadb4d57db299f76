"""`push(folder, repo_id)`: upload a merged folder, or a run's adapter with its model card, in one hub commit.

The token comes from huggingface_hub's own defaults (HF_TOKEN, or `hf auth login`), and the endpoint from
HF_ENDPOINT; neither is printed or written by lora-tune.

Exit codes (README, "Errors and exit codes"): what the user gave is wrong (the folder, the repo id, no token or one
the hub refuses with 401/403, HF_HUB_OFFLINE set, a bad timeout) is an `ExportError`, exit 2; the hub unreachable,
silent, failing after the retries, or refusing the commit for another reason is a `HubError`, exit 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.export.card import adapter_card
from lora_tune.export.errors import ExportError, ExportOptionError
from lora_tune.recipe.load import load_recipe
from lora_tune.run.layout import RunDir
from lora_tune.run.secrets import redact, redact_json

log = logging.getLogger(__name__)

REPO_ID = r"^[\w.-]+/[\w.-]+$"
ATTEMPTS = 3  # per hub call (create_repo, create_commit)
BACKOFF_S = 2.0  # seconds before the 2nd attempt, doubled before each next one
RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # transient; any other status fails at once
CREDENTIAL_STATUS = {401, 403}  # the token is missing, wrong, or may not write to this repo: the user's to fix
DEFAULT_TIMEOUT_S = 30.0  # per request: connect, and each wait for the hub's next bytes
TIMEOUT_ENV = "LORA_TUNE_HUB_TIMEOUT"  # also reaches `merge --push-to-hub`, which has no --timeout flag
sleep = time.sleep  # monkeypatched by tests
# Weights are uploaded as they are, never read for masking: a file with one of these suffixes, or a NUL byte in its
# first SNIFF_BYTES (safetensors, GGUF and SentencePiece files all have one), is binary.
BINARY_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".onnx", ".h5", ".model")
SNIFF_BYTES = 8192


class HubError(ExportError):
    """The hub was unreachable or silent, kept failing, or refused for a reason other than credentials (exit 1)."""

    exit_code = 1


@dataclass
class PushResult:
    repo_id: str
    files: list[tuple[str, int]]  # (path in the repo, size in bytes)
    kind: str  # "merged model" or "adapter"
    message: str
    url: str | None = None  # commit URL; None on a dry run
    dry_run: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path in the folder, why it is not uploaded)
    masked: list[str] = field(default_factory=list)  # paths in the repo whose text had credentials masked
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_bytes = sum(size for _, size in self.files)


def vetted_files(folder: Path, *, recursive: bool) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """The regular files under `folder` ({posix path relative to it: file}), and what was left out, with why.

    A symlink is never followed, to a file or a folder, inside or outside: it can point at a key or a home folder,
    and what `ls` shows in the folder should be all that leaves the machine. Hidden names (.env, .git, .cache)
    hold credentials and tool state, not model files. Without `recursive`, sub-folders are left out too.
    """
    files: dict[str, Path] = {}
    skipped: list[tuple[str, str]] = []
    pending = [folder]
    while pending:  # no link is followed, so this walks a finite tree once
        current = pending.pop()
        for entry in _entries(current):
            path = Path(entry.path)
            rel = path.relative_to(folder).as_posix()
            is_dir = entry.is_dir(follow_symlinks=False)
            if entry.is_symlink():
                skipped.append((rel, "symlink, not followed"))
            elif entry.name.startswith("."):
                skipped.append((rel + "/" if is_dir else rel, "hidden"))
            elif redact(entry.name) != entry.name:  # the name would be published as it is
                skipped.append((rel + "/" if is_dir else rel, "its name holds a credential"))
            elif is_dir and recursive:
                pending.append(path)
            elif is_dir:
                skipped.append((rel + "/", "sub-folder"))
            elif entry.is_file(follow_symlinks=False):
                files[rel] = path
            else:
                skipped.append((rel, "not a regular file"))
    return dict(sorted(files.items())), sorted(skipped)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of one folder; one that cannot be read (permissions) is a one-line error naming it."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise ExportError(
            f"{shown(str(folder))}: cannot read this folder ({exc.strerror or type(exc).__name__}); "
            "fix its permissions, or move it out of the folder you push"
        ) from None


def collect(folder: Path) -> tuple[str, dict[str, Path | bytes], str, list[tuple[str, str]]]:
    """What to upload: (kind, {path in repo: file or bytes}, run name, [(skipped path, why)]).

    The returned dict is the whole upload: push() commits exactly these entries and nothing else.
    """
    _entries(folder)  # a folder that cannot be listed is named as such, before anything looks inside it
    run = RunDir(folder)
    if run.is_run():
        found, skipped = vetted_files(run.adapter, recursive=False) if run.adapter.is_dir() else ({}, [])
        if "adapter_config.json" not in found:
            raise ExportError(f"{folder}: this run has no adapter/ yet (did training finish?)")

        files: dict[str, Path | bytes] = {name: p for name, p in found.items() if name != "README.md"}
        files["README.md"] = adapter_card(run, load_recipe(run.recipe, check_paths=False)).encode("utf-8")
        return "adapter", files, folder.resolve().name, [(f"adapter/{path}", why) for path, why in skipped]
    # What the folder is, from its top level alone: `push /` (or any folder that is not a model) is refused
    # without walking all that lies below it.
    top, _ = vetted_files(folder, recursive=False)
    if "config.json" in top and any(name.endswith(".safetensors") for name in top):
        found, skipped = vetted_files(folder, recursive=True)
        card = found.get("README.md")
        named = re.search(r"lora-tune run `([^`]+)`", _read_text(card)) if card else None
        return "merged model", dict(found), named.group(1) if named else folder.resolve().name, skipped
    if any(name.endswith(".gguf") for name in top):  # a `lora-tune export` folder
        found, skipped = vetted_files(folder, recursive=True)
        return "GGUF files", dict(found), folder.resolve().name, skipped
    raise ExportError(
        f"{folder}: neither a lora-tune run directory (recipe.yaml + adapter/), a merged model folder "
        "(config.json + *.safetensors) nor a GGUF export folder (*.gguf)"
    )


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    message: str | None = None,
    endpoint: str | None = None,
    timeout: float | None = None,
) -> PushResult:
    """Create the repo if needed (exist_ok) and upload every vetted file in a single commit.

    `timeout` (seconds; default LORA_TUNE_HUB_TIMEOUT, else 30) bounds each request's connect and each wait for
    an answer; each hub call is tried ATTEMPTS times.
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    seconds = _timeout(timeout)
    if not folder.is_dir():
        raise ExportError(f"{folder}: not a directory")
    try:
        kind, files, name, skipped = collect(folder)
        files, masked = masked_files(files)
    except OSError as exc:  # what the checks below did not foresee (a file that vanished, an odd mount)
        where = shown(str(exc.filename or folder))
        raise ExportError(f"{where}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    message = redact(message or f"Upload {kind} of lora-tune run '{name}'")  # a commit message is published too
    sizes = [(path, len(src) if isinstance(src, bytes) else _size_of(src)) for path, src in files.items()]
    result = PushResult(
        repo_id=repo_id, files=sizes, kind=kind, message=message, dry_run=dry_run, skipped=skipped, masked=masked
    )
    if dry_run:
        return result
    with _client_timeout(seconds):
        result.url = _upload(repo_id, files, message, private=private, endpoint=endpoint, timeout=seconds)
    return result


def masked_files(files: dict[str, Path | bytes]) -> tuple[dict[str, Path | bytes], list[str]]:
    """The upload with every text file's credentials masked as the model card's are (`redact`; a JSON file string
    by string, so it stays valid JSON), and the paths that changed. A file with nothing to mask, and every binary
    file (weights), is uploaded as it is."""
    upload: dict[str, Path | bytes] = {}
    masked: list[str] = []
    for path, src in files.items():
        text = _text_of(src)
        clean = text if text is None else _masked_text(path, text)
        if clean == text:
            upload[path] = src
        else:
            upload[path] = clean.encode("utf-8")
            masked.append(path)
    return upload, masked


def _text_of(src: Path | bytes) -> str | None:
    """The file's text, or None for a binary file."""
    if isinstance(src, Path) and src.suffix.lower() in BINARY_SUFFIXES:
        return None
    try:
        data = src if isinstance(src, bytes) else _read_bytes(src)
        return None if b"\0" in data[:SNIFF_BYTES] else data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _masked_text(path: str, text: str) -> str:
    if not path.endswith(".json"):
        return redact(text)
    try:
        data = json.loads(text)
    except ValueError:  # not JSON after all: masked as text
        return redact(text)
    clean = redact_json(data)
    return text if clean == data else json.dumps(clean, indent=2, ensure_ascii=False) + "\n"


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _read_text(path: Path) -> str:
    return _read_bytes(path).decode("utf-8", errors="replace")


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: OSError) -> ExportError:
    return ExportError(f"{shown(str(path))}: cannot read this file ({exc.strerror or type(exc).__name__})")


def _upload(
    repo_id: str, files: dict[str, Path | bytes], message: str, *, private: bool, endpoint: str | None, timeout: float
) -> str:
    """create_repo + create_commit with retries; every failure becomes one line (ExportError or HubError)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if _token() is None:
        raise ExportError("push: no hub token; log in with `hf auth login` or set HF_TOKEN")
    api = HfApi(endpoint=endpoint)
    started = time.monotonic()
    try:
        with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), "create repo")
        # create_commit rather than upload_folder: with hf_xet installed, upload_folder may split a folder into
        # several commits; one commit keeps a push all-or-nothing. Operations are rebuilt for each attempt.
        info = with_retries(
            lambda: api.create_commit(
                repo_id,
                operations=[CommitOperationAdd(path_in_repo=path, path_or_fileobj=src) for path, src in files.items()],
                commit_message=message,
            ),
            "commit",
        )
    except OfflineModeIsEnabled:
        raise ExportError("push: HF_HUB_OFFLINE is set; unset it to reach the hub") from None
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status in CREDENTIAL_STATUS:
            raise ExportError(
                f"push to {repo_id} failed: HTTP {status}: {_first_line(exc)} (log in with `hf auth login` or set "
                "HF_TOKEN, with write access to this repo)"
            ) from None
        tries = (
            f" after {ATTEMPTS} tries ({time.monotonic() - started:.0f} s in all)" if status in RETRY_STATUS else ""
        )
        raise HubError(f"push to {repo_id} failed: HTTP {status or '?'}{tries}: {_first_line(exc)}") from None
    except _timeout_errors():
        raise HubError(
            f"push: the hub at {api.endpoint} did not answer within {timeout:g} s ({ATTEMPTS} tries, "
            f"{time.monotonic() - started:.0f} s in all); check the network or HF_ENDPOINT, "
            f"or raise --timeout ({TIMEOUT_ENV})"
        ) from None
    except _connection_errors() as exc:
        raise HubError(
            f"push: cannot reach the hub at {api.endpoint} ({ATTEMPTS} tries, {time.monotonic() - started:.0f} s "
            f"in all): {type(exc).__name__}: {_first_line(exc)}; check the network or HF_ENDPOINT"
        ) from None
    return info.commit_url


def check_repo_id(repo_id: str) -> None:
    """ORG/NAME, also by the hub's rules (no '--' or '..', no leading '-'): refused before any upload, exit 2."""
    if not re.match(REPO_ID, repo_id):
        raise ExportError(f"repo id: expected ORG/NAME, got '{repo_id}'")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ExportError(f"repo id: {_first_line(exc)}") from None


def _timeout(value: float | None) -> float:
    """Seconds per request: the argument, else LORA_TUNE_HUB_TIMEOUT, else DEFAULT_TIMEOUT_S."""
    raw = value if value is not None else os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        expected = f"expected a number of seconds > 0, got '{raw}'"
        if value is not None:
            raise ExportOptionError("timeout", expected)
        raise ExportError(f"{TIMEOUT_ENV}: {expected}")
    return seconds


class NoAnswer(TimeoutError):
    """A request got no answer within the timeout.

    Deliberately a plain TimeoutError, not the HTTP client's timeout class: huggingface_hub retries that one itself in
    some calls (preupload, LFS: 5 more tries and 23 s of sleeps), nested inside our ATTEMPTS, which turned 3 tries
    into 18 waits and made the count in the error wrong.
    """


@contextmanager
def _client_timeout(seconds: float) -> Iterator[None]:
    """Inside, every request huggingface_hub sends has connect/read/write/pool timeouts of `seconds`.

    Its shared client is built with timeout=None and create_repo/create_commit pass none, so a hub that accepts the
    connection and never answers would hang a push forever. The current client factory (a user's own, with proxies
    or certificates, if one was set) is wrapped rather than replaced, and put back afterwards.
    """
    from huggingface_hub.utils import _http, set_client_factory

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory
    client_timeouts = _timeout_errors()

    def factory() -> Any:
        client = previous()
        client.timeout = type(client.timeout)(seconds)  # httpx2.Timeout in huggingface_hub 2.x, httpx.Timeout in 1.x
        send = client.send  # every request goes through send(): get/post/request/stream alike

        def send_or_give_up(*args: Any, **kwargs: Any) -> Any:
            try:
                return send(*args, **kwargs)
            except client_timeouts as exc:
                raise NoAnswer(f"no answer within {seconds:g} s") from exc

        client.send = send_or_give_up
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def with_retries(call: Callable[[], Any], what: str) -> Any:
    """`call()`, retried up to ATTEMPTS times with exponential backoff on connection errors, HTTP 408/429/5xx."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    transient = _connection_errors()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except OfflineModeIsEnabled:
            raise
        except (HfHubHTTPError, *transient) as exc:
            status = _status(exc) if isinstance(exc, HfHubHTTPError) else None
            if isinstance(exc, HfHubHTTPError) and status not in RETRY_STATUS:
                raise
            if attempt == ATTEMPTS:
                raise
            delay = BACKOFF_S * 2 ** (attempt - 1)
            reason = str(exc) if isinstance(exc, NoAnswer) else type(exc).__name__
            if status is not None:
                reason = f"HTTP {status}"
            log.warning(
                "push: %s failed (%s), retrying in %.0fs (attempt %d/%d)", what, reason, delay, attempt + 1, ATTEMPTS
            )
            sleep(delay)
    raise AssertionError("unreachable")


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    token = _token()
    return first.replace(token, "***") if token else first


def _token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - only used to scrub messages and to say "log in" before any request
        return None


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.4; httpx/requests before)."""
    return (
        ConnectionError,
        TimeoutError,
        *_client_errors(
            ("httpx2", "TransportError"),
            ("httpx", "TransportError"),
            ("requests", "ConnectionError"),
            ("requests", "Timeout"),
        ),
    )


def _timeout_errors() -> tuple[type[BaseException], ...]:
    """The part of `_connection_errors` that means "no answer came in time" (connect, read or write)."""
    return (
        TimeoutError,
        *_client_errors(("httpx2", "TimeoutException"), ("httpx", "TimeoutException"), ("requests", "Timeout")),
    )


def _client_errors(*names: tuple[str, str]) -> list[type[BaseException]]:
    """(module, class) pairs that are importable here; a client that is not installed cannot raise its errors."""
    errors: list[type[BaseException]] = []
    for module, name in names:
        try:
            cls = getattr(__import__(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return errors


def format_push(result: PushResult) -> str:
    """The listing a user reads before uploading: one line per file (names escaped, so that a name cannot add a
    line of its own), the files whose credentials were masked, what was skipped and why."""
    masked = set(result.masked)
    lines = [
        f"{'Would upload' if result.dry_run else 'Uploaded'} {result.kind}: {len(result.files)} files, "
        f"{_size(result.total_bytes)} -> {result.repo_id}",
        *(
            f"  {shown(path)}  {_size(size)}{'  (credentials masked)' if path in masked else ''}"
            for path, size in result.files
        ),
        *(f"  skipped {shown(path)} ({why})" for path, why in result.skipped),
        f"  commit message: {shown(result.message)}",
    ]
    if result.url:
        lines.append(f"  commit: {result.url}")
    return "\n".join(lines)


def shown(name: str) -> str:
    """`name` as one line shows it: a backslash, a line break or any other character that does not print
    (a terminal's escape sequences, a name's undecodable bytes) written as a Python escape."""
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in name)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
