"""Fixtures shared by unit test modules (pytest provides them; no test module imports another)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import TIMEOUT_ENV, TOKEN


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Callable[[str], None], list[float]]]:
    """The suite runs offline: here huggingface_hub may reach loopback endpoints only, with a token, no real sleeps."""
    import huggingface_hub.constants
    import huggingface_hub.utils

    # huggingface_hub 2.4 fetches an agent registry from the endpoint once per process (its own 3 s timeout) when
    # it first builds headers; resolving it now, while the suite is still offline, leaves only the push to time.
    if hasattr(huggingface_hub.utils, "is_agent"):
        huggingface_hub.utils.is_agent()

    def point_at(url: str) -> None:
        assert url.startswith("http://127.0.0.1:")
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)  # read from HF_ENDPOINT once, at import

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    sleeps: list[float] = []
    push_module = importlib.import_module("lora_tune.export.push")  # the package's `push` shadows the module
    monkeypatch.setattr(push_module, "sleep", sleeps.append)
    yield point_at, sleeps
