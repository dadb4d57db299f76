"""`serve_model`: check the server's options and the path, open the backend, serve (what `lora-tune serve` runs)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lora_tune.errors import OptionError
from lora_tune.serve.backend import model_kind
from lora_tune.serve.load import model_name as name_of
from lora_tune.serve.load import open_backend
from lora_tune.serve.protocol import Limits
from lora_tune.serve.server import ServeConfig, serve

log = logging.getLogger(__name__)

API_KEY_ENV = "LORA_TUNE_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # only this machine can reach a server listening there


def serve_model(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    max_tokens_limit: int = 1024,
    max_body_bytes: int = 1 << 20,
    max_waiting: int = 64,
    shutdown_grace: float = 30.0,
) -> int:
    """Serve the model at `path` (a run directory, a merged folder or a .gguf file) until SIGTERM or Ctrl-C and
    return 0. The options and the path are refused in one line before any weights are read; `api_key` defaults to
    LORA_TUNE_API_KEY, and `model_name` to the path's name."""
    check_options(
        port=port,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        max_waiting=max_waiting,
        shutdown_grace=shutdown_grace,
    )
    model_kind(Path(path))  # a bad path fails here, before any weights are read
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if api_key:  # redact() masks the values of TOKEN_ENV: a key given as an argument too, in any line printed
        os.environ[API_KEY_ENV] = api_key
    if api_key is None and host not in LOCAL_HOSTS:
        log.warning("warning: listening on %s without an API key: anyone who can reach it may use it", host)
    backend = open_backend(path)
    config = ServeConfig(
        host=host,
        port=port,
        api_key=api_key,
        model_name=model_name or name_of(path),
        limits=Limits(
            max_tokens=max_tokens_limit, default_max_tokens=min(backend.defaults.max_new_tokens, max_tokens_limit)
        ),
        max_body_bytes=max_body_bytes,
        max_waiting=max_waiting,
        shutdown_grace=shutdown_grace,
    )
    return serve(backend, config)


def check_options(
    *, port: int, max_tokens_limit: int, max_body_bytes: int, max_waiting: int, shutdown_grace: float
) -> None:
    """Each limit within its range, or an OptionError naming the first one that is not."""
    checks = {
        "port": (0 <= port <= 65535, "a port between 0 and 65535", port),
        "max_tokens_limit": (max_tokens_limit >= 1, "a number of tokens >= 1", max_tokens_limit),
        "max_body_bytes": (max_body_bytes >= 1024, "at least 1024 bytes", max_body_bytes),
        "max_waiting": (max_waiting >= 1, "at least 1", max_waiting),
        "shutdown_grace": (shutdown_grace >= 0, "seconds >= 0", shutdown_grace),
    }
    for option, (ok, expected, value) in checks.items():
        if not ok:
            raise OptionError(option, f"expected {expected}, got {value}")
