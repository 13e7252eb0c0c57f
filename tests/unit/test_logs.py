"""Which lines the proxy's own logging set-up keeps, asked before a line's fields are gathered."""

from __future__ import annotations

import logging

import pytest

from extproc import logs


def test_a_configured_level_decides_what_is_kept() -> None:
    logs.configure("console", "warning")  # as the test session runs (tests/conftest.py)
    assert logs.configured_level == logging.WARNING
    assert not logs.keeps(logging.INFO)  # the access log's fields are not even gathered
    assert logs.keeps(logging.WARNING) and logs.keeps(logging.ERROR)


def test_without_extproc_set_up_the_hosts_loggers_decide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "configured_level", None)
    assert logs.keeps(logging.DEBUG) and logs.keeps(logging.INFO)
