"""Fixtures shared by the integration and parity suites: loopback servers only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc import logs
from extproc.demo.upstream import EchoUpstream
from tests.support.processor import ScriptedProcessor


@pytest.fixture
def upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as server:
        yield server


@pytest.fixture
def processor() -> Iterator[ScriptedProcessor]:
    with ScriptedProcessor() as server:
        yield server


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    """Only warnings and errors from the proxy under test, on stderr (captured per test)."""
    logs.configure("console", "warning")
