"""`push(folder, repo_id)`: upload a merged folder, or a run's adapter with its model card, in one hub commit.

The token comes from huggingface_hub's own defaults (HF_TOKEN, or `hf auth login`), and the endpoint from
HF_ENDPOINT; neither is printed or written by lora-tune.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.export.errors import ExportError
from lora_tune.run_dir import RunDir

log = logging.getLogger(__name__)

REPO_ID = r"^[\w.-]+/[\w.-]+$"
ATTEMPTS = 3  # per hub call (create_repo, create_commit)
BACKOFF_S = 2.0  # seconds before the 2nd attempt, doubled before each next one
RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # transient; any other status fails at once
sleep = time.sleep  # monkeypatched by tests


@dataclass
class PushResult:
    repo_id: str
    files: list[tuple[str, int]]  # (path in the repo, size in bytes)
    kind: str  # "merged model" or "adapter"
    message: str
    url: str | None = None  # commit URL; None on a dry run
    dry_run: bool = False
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_bytes = sum(size for _, size in self.files)


def collect(folder: Path) -> tuple[str, dict[str, Path | bytes], str]:
    """What to upload: (kind, {path in repo: file or bytes}, run name)."""
    run = RunDir(folder)
    if run.is_run():
        if not (run.adapter / "adapter_config.json").is_file():
            raise ExportError(f"{folder}: this run has no adapter/ yet (did training finish?)")
        from lora_tune.export.card import adapter_card
        from lora_tune.recipe import load_recipe

        files: dict[str, Path | bytes] = {
            p.name: p for p in sorted(run.adapter.iterdir()) if p.is_file() and p.name != "README.md"
        }
        files["README.md"] = adapter_card(run, load_recipe(run.recipe, check_paths=False)).encode("utf-8")
        return "adapter", files, folder.resolve().name
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        files = {
            p.relative_to(folder).as_posix(): p
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        }
        card = folder / "README.md"
        named = re.search(r"lora-tune run `([^`]+)`", card.read_text(encoding="utf-8")) if card.is_file() else None
        return "merged model", files, named.group(1) if named else folder.resolve().name
    raise ExportError(
        f"{folder}: neither a lora-tune run directory (recipe.yaml + adapter/) nor a merged model folder "
        "(config.json + *.safetensors)"
    )


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    message: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Create the repo if needed (exist_ok) and upload every file in a single commit."""
    folder = Path(folder)
    if not re.match(REPO_ID, repo_id):
        raise ExportError(f"repo id: expected ORG/NAME, got '{repo_id}'")
    if not folder.is_dir():
        raise ExportError(f"{folder}: not a directory")
    kind, files, name = collect(folder)
    message = message or f"Upload {kind} of lora-tune run '{name}'"
    sizes = [(path, len(src) if isinstance(src, bytes) else src.stat().st_size) for path, src in files.items()]
    result = PushResult(repo_id=repo_id, files=sizes, kind=kind, message=message, dry_run=dry_run)
    if dry_run:
        return result

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=endpoint)
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
        status = _status(exc) or "?"
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        raise ExportError(f"push to {repo_id} failed: HTTP {status}: {_first_line(exc)}{hint}") from None
    except _connection_errors() as exc:
        raise ExportError(
            f"push to {repo_id} failed: cannot reach the hub after {ATTEMPTS} attempts: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None
    result.url = info.commit_url
    return result


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
            reason = f"HTTP {status}" if status is not None else type(exc).__name__
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
    except Exception:  # noqa: BLE001 - only used to scrub messages
        return None


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.4; httpx/requests before)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
    ):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def format_push(result: PushResult) -> str:
    lines = [
        f"{'Would upload' if result.dry_run else 'Uploaded'} {result.kind}: {len(result.files)} files, "
        f"{_size(result.total_bytes)} -> {result.repo_id}",
        *(f"  {path}  {_size(size)}" for path, size in result.files),
        f"  commit message: {result.message}",
    ]
    if result.url:
        lines.append(f"  commit: {result.url}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
