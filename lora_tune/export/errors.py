"""Errors of `lora-tune merge` and `lora-tune push`: each prints as one line."""

from __future__ import annotations

from lora_tune.errors import LoraTuneError, OptionError


class ExportError(LoraTuneError):
    """The run, the base model, the adapter or the destination cannot be exported as asked (exit 2)."""


class ExportOptionError(OptionError, ExportError):
    """An argument of `merge`, `export_gguf` or `push` is refused; `option` names the parameter (exit 2)."""


class VerificationError(LoraTuneError):
    """The merged model does not compute what base + adapter computes, within the dtype's tolerance (exit 1)."""

    exit_code = 1
