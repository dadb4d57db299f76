"""serve_model's option checks: each limit refused in one line that names its parameter."""

from __future__ import annotations

import pytest

from lora_tune.errors import OptionError
from lora_tune.serve.start import check_options

GOOD = {"port": 8000, "max_tokens_limit": 1024, "max_body_bytes": 1 << 20, "max_waiting": 64, "shutdown_grace": 30.0}


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("port", 70000, "expected a port between 0 and 65535, got 70000"),
        ("max_tokens_limit", 0, "expected a number of tokens >= 1, got 0"),
        ("max_body_bytes", 5, "expected at least 1024 bytes, got 5"),
        ("max_waiting", 0, "expected at least 1, got 0"),
        ("shutdown_grace", -1.0, "expected seconds >= 0, got -1.0"),
    ],
)
def test_a_limit_out_of_range_names_its_parameter(option: str, value: float, message: str) -> None:
    check_options(**GOOD)
    with pytest.raises(OptionError) as refused:
        check_options(**{**GOOD, option: value})
    assert (refused.value.option, refused.value.message) == (option, message)
