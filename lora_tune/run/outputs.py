"""What an output folder may lose: the one owner of every folder a lora-tune command writes.

Every command that writes a folder (train: the run directory; merge: the merged model; export: the GGUF folder;
the quickstart's base) declares an `OutputKind` and asks here before it writes:

- A folder lora-tune wrote carries a marker file (the kind's `marker`) that lists the entries the command wrote.
  Those entries, the kind's `fixed` names and the marker itself are lora-tune's; everything else in the folder
  (a file at the top, a sub-folder with the user's files, a dotfile) is the user's.
- A command replaces only lora-tune's entries. When anything else is there, it refuses in one line, before any work,
  and deletes nothing (`refuse_foreign`). A folder without a marker holds nothing of lora-tune's (except a run made
  before runs had markers: `OutputKind.legacy`).
- Build folders (written in full, then renamed into place) and what a killed command left behind are recognised by
  a marker written inside them (`BUILD_MARKER`), never by their name alone: a user's `.export-backup/` is the
  user's, whatever its name.
- Files and folders are created with the permissions the umask gives (as `save_pretrained` creates them), not the
  0600 / 0700 of `mkstemp` / `mkdtemp`: a model server under another account must be able to read them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lora_tune.errors import OptionError

log = logging.getLogger(__name__)

BUILD_MARKER = ".lora-tune-build"  # inside a folder lora-tune is writing and will rename into place or remove
WRITE_PROBE = ".lora-tune-write-check."  # ensure_writable's file, removed at once (a kill may leave one)
ATOMIC_SUFFIX = ".tmp"  # write_text_atomic's temporaries: .NAME.<random>.tmp beside NAME


class OutputError(OptionError):
    """An output folder cannot be written without losing something the user had (exit 2). `option` names the folder
    as the caller was given it: a parameter (`output`) or a recipe key (`output_dir`)."""


@dataclass(frozen=True)
class OutputKind:
    """A kind of folder a lora-tune command writes.

    `what` names it in messages ("run directory"); `option` is what names the folder: the recipe key (`output_dir`)
    or the parameter of the function that writes it (`output`, which the command line shows as its flag); `marker`
    is the file inside that proves lora-tune made it; `fixed` are names the kind may always write; `legacy`
    recognises a folder of this kind written before it had a marker (its fixed names only).
    """

    what: str
    option: str
    marker: str
    fixed: frozenset[str] = field(default_factory=frozenset)
    legacy: Callable[[Path], bool] | None = None


# Markers ----------------------------------------------------------------------------------------------------------


def read_marker(folder: Path, kind: OutputKind) -> set[str] | None:
    """The entries the marker lists (empty when it lists none), or None when the folder has no marker of `kind`."""
    path = folder / kind.marker
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return set()  # a marker from before markers listed entries (a run's plain-text one): the fixed names
    entries = data.get("entries") if isinstance(data, dict) else None
    return {str(name) for name in entries} if isinstance(entries, list) else set()


def record(folder: Path, kind: OutputKind, names: Iterable[str] = ()) -> None:
    """Write the marker, adding `names` to the entries it lists. Call it before the entries appear under their names:
    a listed name that is absent is harmless, an entry that appeared unlisted would be refused as the user's."""
    listed = (read_marker(folder, kind) or set()) | {name for name in names if name != kind.marker}
    body = {"written_by": "lora-tune", "kind": kind.what, "entries": sorted(listed - kind.fixed)}
    write_text_atomic(folder / kind.marker, json.dumps(body, indent=1) + "\n")


def is_build_dir(path: Path) -> bool:
    """A folder lora-tune is writing (or was, when a command was killed): it carries the build marker."""
    return path.is_dir() and not path.is_symlink() and (path / BUILD_MARKER).is_file()


# Ownership --------------------------------------------------------------------------------------------------------


def foreign_entries(folder: Path, kind: OutputKind) -> list[str]:
    """Top-level names in `folder` that no lora-tune command of `kind` wrote, sorted."""
    listed = read_marker(folder, kind)
    if listed is None and kind.legacy is not None and kind.legacy(folder):
        listed = set()
    if listed is None:
        return sorted(entry.name for entry in folder.iterdir())
    ours = listed | kind.fixed | {kind.marker}
    return sorted(entry.name for entry in folder.iterdir() if not _is_ours(entry, ours))


def _is_ours(entry: Path, ours: set[str] | frozenset[str]) -> bool:
    name = entry.name
    if is_build_dir(entry) or name.startswith(WRITE_PROBE):
        return True
    if name in ours:
        return True
    # write_text_atomic's temporary of one of our files: .recipe.yaml.k2j3.tmp (a file: it cannot hold a marker)
    if name.startswith(".") and name.endswith(ATOMIC_SUFFIX) and entry.is_file() and not entry.is_symlink():
        return name[1:].removesuffix(ATOMIC_SUFFIX).rsplit(".", 1)[0] in ours
    return False


def is_ours(folder: Path, kind: OutputKind) -> bool:
    """`folder` is a folder of `kind` (marked, or a legacy one) that holds nothing but lora-tune's entries."""
    if not folder.is_dir():
        return False
    marked = read_marker(folder, kind) is not None or (kind.legacy is not None and kind.legacy(folder))
    return marked and not foreign_entries(folder, kind)


def is_empty(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


def refuse_foreign(folder: Path, kind: OutputKind) -> None:
    """Refuse, in one line, an existing folder that holds anything lora-tune did not write as `kind`."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(kind.option, f"'{folder}' is a file, expected a folder")
    if not folder.is_dir():
        return
    foreign = foreign_entries(folder, kind)
    if not foreign:
        return
    if read_marker(folder, kind) is None and not (kind.legacy is not None and kind.legacy(folder)):
        raise OutputError(
            kind.option,
            f"'{folder}' is not empty and holds no lora-tune {kind.what} ({listing(foreign)}); "
            "choose a new or empty folder (nothing was deleted)",
        )
    raise OutputError(
        kind.option,
        f"'{folder}' holds files lora-tune did not write ({listing(foreign)}); lora-tune replaces "
        f"only what it wrote in a {kind.what}: move these away or choose another folder (nothing was deleted)",
    )


def check_overlap(output: Path, sources: Iterable[Path], option: str) -> None:
    """Refuse an output folder that is, contains or lies inside a folder the command reads."""
    target = output.resolve()
    for source in sources:
        keep = source.resolve()
        if target == keep or keep.is_relative_to(target) or target.is_relative_to(keep):
            raise OutputError(
                option, f"'{output}' overlaps '{source}', which this command reads; choose another folder"
            )


def remove_ours(folder: Path, kind: OutputKind, *, keep: Iterable[str] = ()) -> None:
    """Delete the entries of `folder` that are lora-tune's (all of them, as checked by `refuse_foreign` first),
    except `keep` (a lock that is held)."""
    refuse_foreign(folder, kind)
    kept = set(keep)
    for entry in folder.iterdir():
        if entry.name not in kept:
            _delete(entry)


def check_replaceable(folder: Path, names: Iterable[str], option: str) -> None:
    """Each of `names` in `folder` is absent or a regular file a command may replace; said before any work, so a
    folder in the way fails now and not after minutes of work."""
    for name in names:
        path = folder / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise OutputError(
                option, f"'{path}' is in the way: it is not a file lora-tune wrote; move it away (nothing was deleted)"
            )


def check_own_json(path: Path, signature: str, option: str) -> None:
    """A JSON file the user names for a report (`check --json FILE`): absent, or a report lora-tune wrote (an object
    whose "written_by" is `signature`), which may be replaced; anything else is refused before any work."""
    check_replaceable(path.parent, [path.name], option)
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not (isinstance(data, dict) and data.get("written_by") == signature):
        raise OutputError(
            option,
            f"'{path}' exists and is not a report lora-tune wrote; choose another file name (nothing was replaced)",
        )


def listing(names: list[str], limit: int = 5) -> str:
    """The first few names, escaped (a name may hold a newline), and how many more."""
    shown = ", ".join(name.encode("unicode_escape").decode("ascii") for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# Build folders ----------------------------------------------------------------------------------------------------


def make_build_dir(parent: Path, prefix: str) -> Path:
    """A new folder `parent/PREFIX<random>`, marked as lora-tune's build folder, with the umask's permissions."""
    build = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    _mark(build)
    return build


def check_build_slot(path: Path, option: str) -> None:
    """A name a command will build at or move an old folder to (`.adapter.tmp`, `.NAME.old`) is free or holds a
    marked leftover; anything else there is the user's and is refused before any work."""
    if path.is_symlink() or (path.exists() and not is_build_dir(path)):
        raise OutputError(
            option, f"'{path}' is in the way and was not made by lora-tune; move it away (nothing was deleted)"
        )


def fresh_build_dir(path: Path, option: str) -> Path:
    """The build folder at a fixed name (a run's `.adapter.tmp`): what a killed command left there is removed, a
    folder lora-tune did not make is refused."""
    check_build_slot(path, option)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    _mark(path)
    return path


def _mark(folder: Path) -> None:
    os.chmod(folder, 0o777 & ~umask())
    (folder / BUILD_MARKER).write_text("lora-tune is writing this folder; it is removed or renamed when done\n")


def unmark(folder: Path) -> None:
    (folder / BUILD_MARKER).unlink(missing_ok=True)


def remove_leftovers(parent: Path, belongs: Callable[[str], bool], what: str) -> list[str]:
    """Remove what killed commands left under `parent`: the folders carrying the build marker whose names
    `belongs` to this output (other outputs' build folders may be live). Call it holding the lock of the output, so
    no live command owns them. Returns the names removed."""
    if not parent.is_dir():
        return []
    found = sorted(p for p in parent.iterdir() if belongs(p.name) and is_build_dir(p))
    if not found:
        return []
    size = sum(tree_bytes(path) for path in found)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    names = [path.name for path in found]
    log.info("%s: removed what an interrupted one left behind: %s (%s)", what, ", ".join(names), _size(size))
    return names


def replace_dir_atomic(build: Path, target: Path) -> None:
    """Move a fully written build folder into place; an older `target` is removed only after that succeeds.

    The old folder is marked as a build folder before it is moved aside as `.NAME.old`, so a kill between the two
    renames leaves a leftover the next command recognises by its marker; the new folder loses its build marker."""
    old = target.with_name(f".{target.name}.old")
    check_build_slot(old, str(target))  # callers check it before their work; this is the last line of defence
    if old.exists():
        shutil.rmtree(old)
    if target.is_dir() and not target.is_symlink():
        _mark(target)
        os.replace(target, old)
    os.replace(build, target)
    unmark(target)
    shutil.rmtree(old, ignore_errors=True)


def tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):  # does not follow links
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


# Files ------------------------------------------------------------------------------------------------------------


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status; elsewhere set and put back)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename over the target; the file gets the umask's
    permissions, as a plain open() would give it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=ATOMIC_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable(folder: Path, option: str) -> None:
    """Refuse, in one line and before any work, a folder this command could not write its results into: a file is
    created and removed there (a permission check alone would pass for root on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=WRITE_PROBE)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            option,
            f"'{folder}' is not writable ({exc.strerror or type(exc).__name__}); choose a folder you can write to",
        ) from None


def make_dir(folder: Path, option: str) -> None:
    """mkdir -p, failing in one line (a read-only or forbidden parent) instead of with a raw OSError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(option, f"cannot create '{folder}' ({exc.strerror or type(exc).__name__})") from None
    ensure_writable(folder, option)
