"""The error types: an OptionError names the library parameter it is about, and survives a trip between processes."""

from __future__ import annotations

import pickle

from lora_tune.errors import LoraTuneError, OptionError
from lora_tune.export.errors import ExportError, ExportOptionError
from lora_tune.run.locks import LockedError
from lora_tune.run.outputs import OutputError


def test_an_option_error_names_the_parameter_and_renders_with_another_name():
    error = OptionError("quant", "expected one of f16, q8_0, got 'q9'")
    assert str(error) == "quant: expected one of f16, q8_0, got 'q9'"
    assert error.render("--quant") == "--quant: expected one of f16, q8_0, got 'q9'"
    assert isinstance(error, LoraTuneError) and error.exit_code == 2


def test_an_export_option_error_is_both_kinds_and_keeps_its_class_when_pickled():
    error = ExportOptionError("dtype", "expected one of bf16, fp16, fp32, got 'int8'")
    assert isinstance(error, ExportError) and isinstance(error, OptionError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ExportOptionError and (copy.option, copy.message) == (error.option, error.message)
    assert str(copy) == str(error)


def test_output_and_lock_errors_are_option_errors():
    assert str(OutputError("output", "'x' is a file, expected a folder")) == "output: 'x' is a file, expected a folder"
    locked = LockedError("output", "'x' is in use by another lora-tune process (pid 1)")
    assert str(locked) == "output 'x' is in use by another lora-tune process (pid 1)"
    assert locked.render("--output") == "--output 'x' is in use by another lora-tune process (pid 1)"
