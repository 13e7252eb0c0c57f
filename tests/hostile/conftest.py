"""Fixtures for the hostile-input suites: one strict upstream, one real processor, one proxy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from extproc.io.server import ProxyServer
from extproc.processor import Processor
from extproc.processor.service import serve
from tests.support.hostile import RecordingUpstream
from tests.support.proxy import running_proxy

# Short enough that entries left waiting for bytes end quickly, long for a loaded machine.
HEAD_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 3.0


class PassThrough(Processor):
    """Sees every request and lets it through: the proxy under test does the refusing."""


@pytest.fixture(scope="module")
def recording_upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def processor_target() -> Iterator[str]:
    server = serve(PassThrough, "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def hostile_proxy(
    recording_upstream: RecordingUpstream, processor_target: str
) -> Iterator[ProxyServer]:
    timeouts: dict[str, Any] = {
        "header_read_timeout": HEAD_TIMEOUT_S,
        "client_timeout": BODY_TIMEOUT_S,
    }
    with running_proxy(recording_upstream.address, processor_target, **timeouts) as proxy:
        yield proxy
