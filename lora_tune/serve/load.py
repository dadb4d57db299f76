"""The backend for a path: llama.cpp for a `.gguf` file, transformers for a run directory or a merged folder."""

from __future__ import annotations

from pathlib import Path

from lora_tune.serve.backend import Backend, model_kind
from lora_tune.serve.gguf_backend import GgufBackend, import_llama_cpp
from lora_tune.serve.hf_backend import TransformersBackend


def open_backend(path: str | Path, slots: int = 1) -> Backend:
    """Load the model at `path`; a bad path is a one-line ServeError before any weights are read. `slots`: for a
    .gguf, how many llama.cpp contexts generate at once."""
    path = Path(path)
    if model_kind(path) == "gguf":
        import_llama_cpp()  # the missing-dependency error before anything else
        return GgufBackend(path, slots=slots)
    return TransformersBackend.open(path)


def model_name(path: str | Path) -> str:
    """The model id clients name in requests and /v1/models lists: the file's or folder's name."""
    path = Path(path).resolve()
    return path.stem if path.is_file() else path.name
