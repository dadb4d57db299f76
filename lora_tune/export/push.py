"""`push(folder, repo_id)`: upload a merged folder, or a run's adapter with its model card, in one hub commit.

The token comes from huggingface_hub's own defaults (HF_TOKEN, or `hf auth login`), and the endpoint from
HF_ENDPOINT; neither is printed or written by lora-tune.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_tune.export.errors import ExportError
from lora_tune.run_dir import RunDir

REPO_ID = r"^[\w.-]+/[\w.-]+$"


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
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=src) for path, src in files.items()]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        # create_commit rather than upload_folder: with hf_xet installed, upload_folder may split a folder into
        # several commits; one commit keeps a push all-or-nothing.
        info = api.create_commit(repo_id, operations=operations, commit_message=message)
    except OfflineModeIsEnabled:
        raise ExportError("push: HF_HUB_OFFLINE is set; unset it to reach the hub") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        raise ExportError(f"push to {repo_id} failed: HTTP {status}: {first}{hint}") from None
    result.url = info.commit_url
    return result


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
