"""Refuse what is unsafe and keep secrets out of everything a run writes or prints.

- Hub tokens: only the environment or `huggingface-cli login` provide them; `redact` removes their values (and any
  string shaped like a token) from logs, saved command lines and error messages.
- Weights: safetensors only; a model folder that only has pickle files (.bin/.pt/.pth/.ckpt, which can run code
  when loaded) is refused unless the recipe sets `model.allow_pickle: true`.
- `trust_remote_code` is passed through only as the recipe sets it, with a warning naming the repository.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lora_tune.errors import LoraTuneError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class UnsafeModelError(LoraTuneError):
    """The model or adapter would be loaded in an unsafe way the recipe did not allow."""


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
