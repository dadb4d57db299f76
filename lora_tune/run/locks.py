"""One process at a time on a run directory or a merge destination: an OS file lock that names its holder.

The lock is `flock` on a small file whose text is the holder's pid, host and start time. The kernel releases it when
the holder exits, however it exits (kill -9 included), so a lock is never stale in the sense of blocking anyone; a
file still carrying text when it is taken means its last holder died without releasing, and that is logged. On a
file system without `flock` (some network mounts) the run goes on unlocked, with a warning.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lora_tune.errors import OptionError

log = logging.getLogger(__name__)


class LockedError(OptionError):
    """Another lora-tune process holds the lock. `option` names the locked folder as the caller was given it (the
    parameter `output`, the recipe key `output_dir`): "output '/x' is in use by another lora-tune process (...)"."""

    def render(self, name: str) -> str:
        return f"{name} {self.message}"


@dataclass
class Lock:
    path: Path
    fd: int | None  # None: the file system refused flock; nothing is held


def acquire(path: Path, option: str, folder: Path) -> Lock:
    """Take the lock at `path` without waiting; the one-line refusal names the locked `folder` and the `option` (a
    parameter or recipe key) that named it."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock, as on a file system without flock
        return Lock(path, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            holder = holder or "holder unknown"
            raise LockedError(option, f"'{folder}' is in use by another lora-tune process ({holder})") from None
        log.warning("lock: %s cannot be locked (%s); going on without a lock", path, exc.strerror)
        return Lock(path, None)
    stale = _read(fd)
    if stale:
        log.info("lock: %s '%s' was left by a process that no longer runs (%s); taken over", option, folder, stale)
    _write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return Lock(path, fd)


def release(lock: Lock) -> None:
    """Empty the file (a clean release) and let go. The file stays: removing it would let a waiting process and a
    new one each lock a different inode of the same name."""
    if lock.fd is None:
        return
    try:
        _write(lock.fd, "")
    finally:
        os.close(lock.fd)  # closing the only descriptor releases the flock
        lock.fd = None


@contextmanager
def held(path: Path, option: str, folder: Path) -> Iterator[Lock]:
    lock = acquire(path, option, folder)
    try:
        yield lock
    finally:
        release(lock)


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 512).decode("utf-8", "replace").strip()


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode("utf-8"))
    os.fsync(fd)
