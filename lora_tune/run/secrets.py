"""Secrets never leave the process: hub tokens and credential-shaped strings are masked in logs, saved command lines,
error messages and model cards."""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import IO, Any

TOKEN_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_TOKEN",
    "HUGGINGFACEHUB_API_TOKEN",
    "WANDB_API_KEY",
    "LORA_TUNE_API_KEY",  # lora-tune serve's key
)


# Hugging Face user/org access tokens: "hf_" then 30+ letters and digits.
TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


MASK = "hf_***"


_known: dict[tuple[Any, ...], list[str]] = {}  # the last answer of _secrets(), by what it was computed from


def _secrets() -> list[str]:
    """The token values to mask, longest first. Asked for every chunk a command prints, so the answer is kept
    while the environment, the saved login and huggingface_hub's presence stay as they were."""
    hub_loaded = "huggingface_hub" in sys.modules
    key = (*[os.environ.get(name, "") for name in TOKEN_ENV], _saved_token(), hub_loaded)
    if key not in _known:
        values = list(key[:-1])
        # A token huggingface_hub obtained itself (OIDC in CI, Colab's vault) can only be in this process once it
        # is imported; importing it just to ask would add a third of a second to every command that prints.
        if hub_loaded:
            try:
                from huggingface_hub import get_token

                values.append(get_token() or "")
            except Exception:  # noqa: BLE001 - redaction must never be the thing that fails
                pass
        _known.clear()
        _known[key] = sorted({v for v in values if len(v) >= 8}, key=len, reverse=True)
    return _known[key]


_saved: dict[str, tuple[int, str]] = {}  # token file -> (mtime_ns, token): read again only when it changes


def _saved_token() -> str:
    """The token `hf auth login` saved, read where huggingface_hub reads it (HF_TOKEN_PATH, else HF_HOME/token),
    also while HF_TOKEN is set, when huggingface_hub's get_token() does not return it."""
    hub = sys.modules.get("huggingface_hub.constants")
    path = getattr(hub, "HF_TOKEN_PATH", None) or os.environ.get("HF_TOKEN_PATH") or _hf_home() + "/token"
    try:
        mtime = os.stat(path).st_mtime_ns
        if _saved.get(path, (None, ""))[0] != mtime:
            _saved[path] = (mtime, Path(path).read_text(encoding="utf-8", errors="replace").strip())
        return _saved[path][1]
    except OSError:  # no saved login, or one this user may not read
        return ""


def _hf_home() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.expanduser(os.path.expandvars(os.environ.get("HF_HOME") or default))


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every known token value, every token-shaped string and every credential shape of
    CREDENTIAL_SHAPES (keys of other services, a password in a URL) replaced by a mask: for logs, error lines, the
    saved command line and everything lora-tune publishes alike. `secrets`: the known values, when the caller
    already has them (`_secrets()`)."""
    for secret in _secrets() if secrets is None else secrets:
        text = text.replace(secret, MASK)
    if not _TRIGGER.search(text):  # most text: one scan instead of one per shape (a tokenizer has 10^5 strings)
        return text
    text = TOKEN_SHAPE.sub(MASK, text)
    for shape, mask in CREDENTIAL_SHAPES:
        text = shape.sub(mask, text)
    return text


# Credentials by shape, for text that is published (model cards): a false alarm costs a few masked characters, a
# leak cannot be taken back. Unlike TOKEN_SHAPE these match inside names too ("data/hf_<token>_train.jsonl").
CREDENTIAL_SHAPES = [
    (re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}"), MASK),  # Hugging Face
    (re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{20,}"), "sk-***"),  # OpenAI, Anthropic (sk-ant-...)
    (re.compile(r"(?<![A-Za-z0-9])(AKIA|ASIA)[A-Z0-9]{16,}"), r"\1***"),  # AWS access key id
    (re.compile(r"(?<![A-Za-z0-9])(gh[pousr]_)[A-Za-z0-9]{20,}"), r"\1***"),  # GitHub
    (re.compile(r"(?<![A-Za-z0-9])github_pat_[A-Za-z0-9_]{20,}"), "github_pat_***"),  # GitHub fine-grained
    (re.compile(r"(?<![A-Za-z0-9])(xox[abprs]-)[A-Za-z0-9-]{10,}"), r"\1***"),  # Slack
    # user:password@ (or a token as the user) of a URL: up to the last "@" before the host's path
    (re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#]+@"), r"\1***@"),
]


# A literal part that every shape above has: text without any of them matches none.
_TRIGGER = re.compile(r"hf_|sk-|AKIA|ASIA|gh[pousr]_|github_pat_|xox[abprs]-|://")


class RedactingFilter(logging.Filter):
    """Logging filter that rewrites each record's message through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Redact on every handler of `logger` (default: the root and lora_tune loggers); idempotent."""
    loggers = [logger] if logger else [logging.getLogger(), logging.getLogger("lora_tune")]
    for target in loggers:
        for handler in target.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


def redact_json(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` (parsed JSON) with every string in it, keys too, through `redact`: a published JSON file stays valid
    JSON, and a shape cannot match across two strings of it."""
    secrets = _secrets() if secrets is None else secrets  # once: a tokenizer.json holds 10^5 strings
    if isinstance(value, dict):
        return {redact_json(k, secrets): redact_json(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_json(v, secrets) for v in value]
    return redact(value, secrets) if isinstance(value, str) else value


HOLD_LIMIT = 1 << 16  # a word longer than this goes out masked as it stands, rather than held without end


class RedactingStream(io.TextIOBase):
    """A text stream that writes what it is given to `target` through `redact`: the CLI's stdout and stderr, so
    that no line any command prints can carry a secret.

    A secret may arrive in pieces (streamed generation writes a few characters at a time, and flushes), so the
    end of what was written is held back until it cannot be the start of a secret: every shape and every known
    value is one word, so what lies before the last whitespace goes out at once; inside a word, what lies before
    the last non-ASCII character goes out too (secrets are ASCII; a URL's user part is not, so not once "://" is
    in the word), which keeps text without spaces (Chinese, Japanese) streaming. `flush()` flushes the target but
    not a held word; `release()` writes it, and from then on every write goes out whole."""

    def __init__(self, target: IO[str]):
        super().__init__()
        self.target = target
        self._held = ""
        self._holding = True
        # Reentrant: a signal handler (training's SIGTERM message) may write while the main thread is inside
        # write(); it then writes its text at once and leaves the held word to the write it interrupted.
        self._lock = threading.RLock()
        self._busy = False

    def write(self, text: str) -> int:
        with self._lock:
            if self._busy:
                self.target.write(redact(text))
                return len(text)
            self._busy = True
            try:
                secrets = _secrets()
                pending = self._held + text
                cut = _safe_end(pending, secrets) if self._holding and len(pending) <= HOLD_LIMIT else len(pending)
                self._held = pending[cut:]
                if cut:
                    self.target.write(redact(pending[:cut], secrets))
            finally:
                self._busy = False
        return len(text)

    def release(self) -> None:
        """Write the held word, and hold nothing from now on (the command has finished)."""
        with self._lock:
            self._holding = False
            held, self._held = self._held, ""
            if held:
                self.target.write(redact(held))

    def flush(self) -> None:
        self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        return self.target.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.target, "errors", None)


def _safe_end(text: str, secrets: list[str]) -> int:
    """How much of `text` may be masked and written now: no secret can straddle this point."""
    if any(c.isspace() for s in secrets for c in s):  # a value with a space in it is still one line
        return max(text.rfind("\n"), text.rfind("\r")) + 1
    end = max(text.rfind(" "), text.rfind("\n"), text.rfind("\r"), text.rfind("\t")) + 1
    word = text[end:]
    if "://" in word or not all(s.isascii() for s in secrets):
        return end
    for i in range(len(word) - 1, -1, -1):
        if not word[i].isascii():
            return end + i + 1
    return end
