"""Every corpus entry against a live extproc: a real processor, a strict recording upstream.

Each entry's raw bytes go to the proxy on a fresh connection; the responses, what became of
the connection, and exactly what the upstream received must match the entry's ``[extproc]``
expectation. The upstream fails the entry on its own if any byte it got is not part of one
valid HTTP/1.1 request (tests/support/hostile.py).
"""

from __future__ import annotations

import pytest

from extproc.io.server import ProxyServer
from tests.support.hostile import Entry, RecordingUpstream, load_corpus, run_entry

pytestmark = pytest.mark.integration

CORPUS = load_corpus()


@pytest.mark.parametrize("entry", CORPUS, ids=[e.name for e in CORPUS])
def test_corpus_entry_through_extproc(
    entry: Entry, hostile_proxy: ProxyServer, recording_upstream: RecordingUpstream
) -> None:
    result = run_entry(hostile_proxy.address, recording_upstream, entry.data)
    assert result == entry.extproc, f"{entry.name}: {entry.about}"


def test_corpus_covers_every_class() -> None:
    groups = {e.group for e in CORPUS}
    assert groups == {
        "baseline",
        "framing",
        "syntax",
        "chunked",
        "limits",
        "targets",
        "versions",
        "host",
        "methods",
        "pipelining",
    }


@pytest.mark.parametrize("entry", CORPUS, ids=[e.name for e in CORPUS])
def test_corpus_expectation_forwards_only_what_was_answered(entry: Entry) -> None:
    """An expectation itself may not allow smuggling: extproc's upstream gets exactly one
    complete request per 200 the client got, and a cut-off one only for a body refused
    after its head went on."""
    expected = entry.extproc
    complete = [u for u in expected.upstream if not u.endswith("(aborted)")]
    assert len(complete) == expected.responses.count(200)
    if len(complete) < len(expected.upstream):
        assert entry.group == "chunked" and expected.responses[-1] in (400, 408)
        assert expected.after == "closed"
