"""The hostile corpus through Envoy 1.40 and through extproc: both outcomes are asserted.

One Envoy (HTTP/1.1 codec defaults, ext_proc then router) and one extproc run in front of the
same strict recording upstream and real processor. Each entry's Envoy result must be its
``[envoy]`` expectation and its extproc result its ``[extproc]`` one, so a change on either
side fails here; where the two differ the entry says why (``difference``), and
docs/guarantees.md lists those differences.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.io.server import ProxyServer
from tests.support.envoy import EnvoyProxy, require_envoy
from tests.support.hostile import Entry, RecordingUpstream, load_corpus, run_entry

pytestmark = pytest.mark.parity

CORPUS = load_corpus()


@pytest.fixture(scope="module")
def envoy(
    recording_upstream: RecordingUpstream,
    processor_target: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EnvoyProxy]:
    require_envoy()
    host, port = processor_target.rsplit(":", 1)
    with EnvoyProxy(
        upstream=recording_upstream.address,
        processor=(host, int(port)),
        # Envoy's 200 ms default is too short for a loaded machine; nothing here tests it.
        ext_proc={"message_timeout": "20s"},
        workdir=Path(tmp_path_factory.mktemp("envoy-hostile")),
    ) as proxy:
        yield proxy


@pytest.mark.parametrize("entry", CORPUS, ids=[e.name for e in CORPUS])
def test_corpus_entry_envoy_and_extproc(
    entry: Entry,
    envoy: EnvoyProxy,
    hostile_proxy: ProxyServer,
    recording_upstream: RecordingUpstream,
) -> None:
    through_envoy = run_entry(envoy.address, recording_upstream, entry.data)
    through_extproc = run_entry(hostile_proxy.address, recording_upstream, entry.data)
    assert (through_envoy, through_extproc) == (entry.envoy, entry.extproc), (
        f"{entry.name}: {entry.about}\n{envoy.log_tail()}"
    )
