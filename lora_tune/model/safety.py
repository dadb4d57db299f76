"""Refuse what is unsafe and keep secrets out of everything a run writes or prints.

- Hub tokens: only the environment or `huggingface-cli login` provide them; `redact` removes their values (and any
  string shaped like a token) from logs, saved command lines and error messages.
- Weights: safetensors only; a model folder that only has pickle files (.bin/.pt/.pth/.ckpt, which can run code
  when loaded) is refused unless the recipe sets `model.allow_pickle: true`.
- `trust_remote_code` is passed through only as the recipe sets it, with a warning naming the repository.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from lora_tune.errors import LoraTuneError

log = logging.getLogger(__name__)

TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN", "WANDB_API_KEY")
# Hugging Face user/org access tokens: "hf_" then 30+ letters and digits.
TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
MASK = "hf_***"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class UnsafeModelError(LoraTuneError):
    """The model or adapter would be loaded in an unsafe way the recipe did not allow."""


def _secrets() -> list[str]:
    values = [os.environ.get(name, "") for name in TOKEN_ENV]
    try:  # the token saved by `huggingface-cli login`, when there is one
        from huggingface_hub import get_token

        values.append(get_token() or "")
    except Exception:  # noqa: BLE001 - redaction must never be the thing that fails
        pass
    return sorted({v for v in values if len(v) >= 8}, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every known token value, every token-shaped string and every credential shape of
    CREDENTIAL_SHAPES (keys of other services, a password in a URL) replaced by a mask: for logs, error lines, the
    saved command line and everything lora-tune publishes alike."""
    for secret in _secrets():
        text = text.replace(secret, MASK)
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


def check_weights_format(source: str, what: str, allow_pickle: bool, key: str = "model.name") -> None:
    """Refuse a local model folder that has pickle weights but no safetensors, unless the recipe allows pickle.

    Hub repositories are checked by transformers itself: `load_model` asks for safetensors only unless allowed.
    """
    folder = Path(source).expanduser()
    if allow_pickle or not folder.is_dir():
        return
    files = [p.name for p in folder.iterdir() if p.is_file()]
    pickles = sorted(n for n in files if n.endswith(PICKLE_SUFFIXES) and not n.startswith("training_args"))
    if pickles and not any(n.endswith(".safetensors") for n in files):
        raise UnsafeModelError(
            f"{key}: {what} '{source}' has only pickle weights ({', '.join(pickles[:3])}), which can run code "
            "when loaded; convert them to safetensors, or set model.allow_pickle: true if you trust their source"
        )


def warn_remote_code(repository: str, enabled: bool) -> None:
    if enabled:
        log.warning(
            "model.trust_remote_code is on: Python code from '%s' will run on this machine with your permissions",
            repository,
        )
