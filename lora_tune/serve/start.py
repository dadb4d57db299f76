"""`serve_model`: check the server's options, the key and the path, bind the address, open the backend, serve (what
`lora-tune serve` runs). Everything that can be refused is refused in one line (exit 2) before any weights are read:
the address is bound first, so a busy port or a bad host does not wait for minutes of loading."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lora_tune.errors import OptionError
from lora_tune.serve.backend import ServeError, model_kind
from lora_tune.serve.load import model_name as name_of
from lora_tune.serve.load import open_backend
from lora_tune.serve.protocol import Limits
from lora_tune.serve.server import ServeConfig, bind, serve

log = logging.getLogger(__name__)

API_KEY_ENV = "LORA_TUNE_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # only this machine can reach a server listening there
# A GGUF slot is a llama.cpp context of its own, holding a key/value cache as long as the model's context.
GGUF_SLOTS = 4
SHORT_KEY = 16  # characters; a shorter key is guessable, and lora-tune's log masks only keys of 8 or more


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
    parallel: int = 16,
) -> int:
    """Serve the model at `path` (a run directory, a merged folder or a .gguf file) until SIGTERM or Ctrl-C and
    return 0. The options and the path are refused in one line before any weights are read; `api_key` defaults to
    LORA_TUNE_API_KEY, and `model_name` to the path's name. `parallel`: requests generated at once (transformers:
    rows of one batch; a .gguf: llama.cpp contexts over the same weights, at most GGUF_SLOTS)."""
    check_options(
        port=port,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        max_waiting=max_waiting,
        shutdown_grace=shutdown_grace,
        parallel=parallel,
    )
    kind = model_kind(Path(path))  # a bad path fails here, before any weights are read
    api_key = check_key(api_key or os.environ.get(API_KEY_ENV) or None)
    if api_key:  # redact() masks the values of TOKEN_ENV: a key given as an argument too, in any line printed
        os.environ[API_KEY_ENV] = api_key
    if api_key is None and host not in LOCAL_HOSTS:
        log.warning("warning: listening on %s without an API key: anyone who can reach it may use it", host)
    try:
        sock = bind(host, port)
    except OSError as exc:  # a busy port (EADDRINUSE), an address not on this machine, a name that does not resolve
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ServeError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    try:
        backend = open_backend(path, slots=min(parallel, GGUF_SLOTS)) if kind == "gguf" else open_backend(path)
    except BaseException:
        sock.close()
        raise
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
        max_batch=parallel,
    )
    return serve(backend, config, sock)


def check_key(key: str | None) -> str | None:
    """The API key, if it is one a client can send: printable ASCII (an HTTP header cannot carry anything else, so
    another key could never authenticate) without spaces. A short key is allowed with a warning."""
    if key is None:
        return None
    if not all(33 <= ord(c) <= 126 for c in key):
        raise OptionError(
            "api_key", f"(or {API_KEY_ENV}) must be printable ASCII without spaces: an HTTP header cannot carry it"
        )
    if len(key) < SHORT_KEY:
        log.warning(
            "warning: the API key is %d characters; use %d or more (e.g. `openssl rand -hex 24`)", len(key), SHORT_KEY
        )
    return key


def check_options(
    *,
    port: int,
    max_tokens_limit: int,
    max_body_bytes: int,
    max_waiting: int,
    shutdown_grace: float,
    parallel: int = 16,
) -> None:
    """Each limit within its range, or an OptionError naming the first one that is not."""
    checks = {
        "port": (0 <= port <= 65535, "a port between 0 and 65535", port),
        "max_tokens_limit": (max_tokens_limit >= 1, "a number of tokens >= 1", max_tokens_limit),
        "max_body_bytes": (max_body_bytes >= 1024, "at least 1024 bytes", max_body_bytes),
        "max_waiting": (max_waiting >= 1, "at least 1", max_waiting),
        "shutdown_grace": (shutdown_grace >= 0, "seconds >= 0", shutdown_grace),
        "parallel": (1 <= parallel <= 256, "between 1 and 256", parallel),
    }
    for option, (ok, expected, value) in checks.items():
        if not ok:
            raise OptionError(option, f"expected {expected}, got {value}")
