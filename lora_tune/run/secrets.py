"""Secrets never leave the process: hub tokens and credential-shaped strings are masked in logs, saved command lines,
error messages and model cards."""

from __future__ import annotations

import logging
import os
import re

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
