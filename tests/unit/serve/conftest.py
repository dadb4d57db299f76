"""Scripted backends for the server's unit tests (tests/unit/serve/scripted.py)."""

from __future__ import annotations

import pytest

from tests.unit.serve.scripted import ScriptedBackend, ScriptedBatchBackend


@pytest.fixture
def scripted() -> type[ScriptedBackend]:
    return ScriptedBackend


@pytest.fixture
def scripted_batch() -> type[ScriptedBatchBackend]:
    return ScriptedBatchBackend
