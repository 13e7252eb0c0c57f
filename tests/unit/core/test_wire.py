"""HTTP/1.1 heads <-> header maps: hop-by-hop rules, forwarding headers, framing."""

from __future__ import annotations

import pytest

from extproc.core import wire
from extproc.models import Headers

OPTS = wire.IngressOptions(forwarded_for=False)


def test_request_from_wire_pseudo_headers_first_then_added_headers() -> None:
    h = wire.request_from_wire(
        b"GET", b"/p?q=1", [(b"host", b"example.com"), (b"accept", b"*/*")], "10.0.0.1", OPTS
    )
    names = [n for n, _ in h]
    assert names == [
        b":authority",
        b":path",
        b":method",
        b":scheme",
        b"accept",
        b"x-forwarded-proto",
        b"x-request-id",
    ]
    assert h.get(b":authority") == b"example.com"
    assert len(h.get(b"x-request-id") or b"") == 36


def test_request_from_wire_keeps_client_request_id_and_proto() -> None:
    h = wire.request_from_wire(
        b"GET",
        b"/",
        [(b"host", b"a"), (b"x-request-id", b"abc"), (b"x-forwarded-proto", b"https")],
        "1.2.3.4",
        OPTS,
    )
    assert h.get_all(b"x-request-id") == [b"abc"]
    assert h.get_all(b"x-forwarded-proto") == [b"https"]


def test_forwarded_for_appends_peer_and_sets_proto() -> None:
    opts = wire.IngressOptions(forwarded_for=True)
    h = wire.request_from_wire(
        b"GET",
        b"/",
        [(b"host", b"a"), (b"x-forwarded-for", b"9.9.9.9"), (b"x-forwarded-proto", b"https")],
        "1.2.3.4",
        opts,
    )
    assert h.get(b"x-forwarded-for") == b"9.9.9.9,1.2.3.4"
    assert h.get_all(b"x-forwarded-proto") == [b"http"]


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    h = wire.request_from_wire(
        b"GET",
        b"/",
        [
            (b"host", b"a"),
            (b"connection", b"foo, keep-alive"),
            (b"foo", b"x"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-connection", b"x"),
            (b"upgrade", b"h2c"),
            (b"te", b"trailers"),
            (b"transfer-encoding", b"chunked"),
            (b"expect", b"100-continue"),
            (b"x-end", b"1"),
        ],
        "1.2.3.4",
        OPTS,
    )
    assert [n for n, _ in h.regular()][:2] == [b"te", b"x-end"]


def test_te_other_than_trailers_is_dropped() -> None:
    h = wire.request_from_wire(b"GET", b"/", [(b"host", b"a"), (b"te", b"gzip")], "1", OPTS)
    assert h.get(b"te") is None


def test_absolute_form_target_sets_authority_and_path() -> None:
    h = wire.request_from_wire(
        b"GET", b"http://other.example:8080/abs?x=1", [(b"host", b"ignored")], "1", OPTS
    )
    assert h.get(b":authority") == b"other.example:8080"
    assert h.get(b":path") == b"/abs?x=1"


def test_missing_host_uses_the_default_authority() -> None:
    opts = wire.IngressOptions(forwarded_for=False, default_authority=b"up:80")
    h = wire.request_from_wire(b"GET", b"/", [], "1", opts)
    assert h.get(b":authority") == b"up:80"


def req(*extra: tuple[bytes, bytes]) -> Headers:
    return Headers(
        [
            (b":authority", b"a.example"),
            (b":path", b"/x"),
            (b":method", b"POST"),
            (b":scheme", b"http"),
            *extra,
        ]
    )


@pytest.mark.parametrize(
    ("headers", "length", "has_body", "expected"),
    [
        (
            req((b"x", b"1")),
            None,
            False,
            [(b"host", b"a.example"), (b"x", b"1"), (b"content-length", b"0")],
        ),
        (
            req((b"content-length", b"0")),
            0,
            False,
            [(b"host", b"a.example"), (b"content-length", b"0")],
        ),
        (
            req((b"content-length", b"5"), (b"x", b"1")),
            5,
            True,
            [(b"host", b"a.example"), (b"content-length", b"5"), (b"x", b"1")],
        ),
        (
            req((b"content-length", b"99")),
            5,
            True,
            [(b"host", b"a.example"), (b"content-length", b"5")],
        ),
        (
            req((b"x", b"1")),
            None,
            True,
            [(b"host", b"a.example"), (b"x", b"1"), (b"transfer-encoding", b"chunked")],
        ),
        (
            req((b"content-length", b"3"), (b"transfer-encoding", b"gzip")),
            None,
            True,
            [(b"host", b"a.example"), (b"transfer-encoding", b"chunked")],
        ),
        (
            req((b"content-length", b"3")),
            None,
            False,
            [(b"host", b"a.example"), (b"content-length", b"0")],
        ),
    ],
    ids=[
        "no-body",
        "zero-length",
        "length",
        "stale-length-fixed",
        "chunked",
        "processor-framing-replaced",
        "bodiless-length-zeroed",
    ],
)
def test_request_to_wire_framing_follows_the_body(
    headers: Headers, length: int | None, has_body: bool, expected: list[tuple[bytes, bytes]]
) -> None:
    method, target, wire_headers = wire.request_to_wire(headers, length, has_body)
    assert (method, target) == (b"POST", b"/x")
    assert wire_headers == expected


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"TRACE", b"CONNECT"])
def test_request_to_wire_adds_no_length_to_a_bodiless_method(method: bytes) -> None:
    headers = req((b"x", b"1"))
    headers.set(b":method", method)
    assert wire.request_to_wire(headers, None, False)[2] == [(b"host", b"a.example"), (b"x", b"1")]


def test_response_processor_view_keeps_connection_and_transfer_encoding() -> None:
    h = wire.response_from_wire(
        200,
        [
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"keep-alive"),
            (b"keep-alive", b"t=5"),
        ],
    )
    assert list(h) == [
        (b":status", b"200"),
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"keep-alive"),
    ]


def test_response_to_wire_strips_hop_by_hop_and_sets_length() -> None:
    h = Headers(
        [
            (b":status", b"201"),
            (b"content-length", b"9"),
            (b"connection", b"close"),
            (b"transfer-encoding", b"chunked"),
            (b"x", b"1"),
        ]
    )
    assert wire.response_to_wire(h, 2, body_allowed=True) == (
        201,
        b"Created",
        [(b"content-length", b"2"), (b"x", b"1")],
    )
    assert wire.response_to_wire(h, None, body_allowed=True)[2] == [(b"x", b"1")]


def test_response_to_wire_keeps_length_when_no_body_may_follow() -> None:
    h = Headers([(b":status", b"200"), (b"content-length", b"9")])
    assert wire.response_to_wire(h, 0, body_allowed=False)[2] == [(b"content-length", b"9")]


def test_reason_phrase_unknown_status_is_empty() -> None:
    assert wire.reason_phrase(299) == b""
    assert wire.reason_phrase(404) == b"Not Found"


@pytest.mark.parametrize(
    ("status", "method", "allowed"),
    [
        (200, b"GET", True),
        (200, b"HEAD", False),
        (204, b"GET", False),
        (304, b"GET", False),
        (101, b"GET", False),
    ],
)
def test_response_may_have_body(status: int, method: bytes, allowed: bool) -> None:
    assert wire.response_may_have_body(status, method) is allowed


def test_body_framing_from_headers() -> None:
    assert wire.request_body_framing([(b"content-length", b"5")]) == (True, 5)
    assert wire.request_body_framing([(b"transfer-encoding", b"chunked")]) == (True, None)
    assert wire.request_body_framing([(b"content-length", b"0")]) == (False, 0)
    assert wire.request_body_framing([]) == (False, 0)
    assert wire.response_body_length([(b"content-length", b"7")]) == 7
    assert wire.response_body_length([]) is None


GOOD = [(b"host", b"a.example"), (b"content-length", b"3")]


@pytest.mark.parametrize(
    ("method", "target", "headers", "version", "status"),
    [
        (b"GET", b"/ok", GOOD, b"1.1", None),
        (b"GET", b"http://a.example/x", GOOD, b"1.1", None),
        (b"OPTIONS", b"*", GOOD, b"1.1", None),
        (b"GET", b"/ok", [(b"x", b"a\tb\x80")], b"1.0", None),
        (b"GET", b"/", GOOD, b"2.0", 505),
        (b"GET", b"/", GOOD, b"1.2", 505),
        (b"CONNECT", b"a.example:443", GOOD, b"1.1", 405),
        (b"GET", b"*", GOOD, b"1.1", 400),
        (b"GET", b"relative", GOOD, b"1.1", 400),
        (b"GET", b"ftp://a.example/", GOOD, b"1.1", 400),
        (b"GET", b"/a#frag", GOOD, b"1.1", 400),
        (b"GET", b"/a\x01", GOOD, b"1.1", 400),
        (b"GET", b"/", [(b"x", b"a\x01b")], b"1.1", 400),
        (b"GET", b"/", [(b"x", b"a\x7fb")], b"1.1", 400),
        (b"GET", b"/", [(b"host", b"a b/c")], b"1.1", 400),
        (b"GET", b"/", [(b"x", b"v")] * 101, b"1.1", 431),
        (b"GET", b"/", [(b"x", b"v")] * 100, b"1.1", None),
        (b"GET", b"/", [(b"x", b"v" * 61440)], b"1.1", 431),
        (b"POST", b"/", [*GOOD, (b"transfer-encoding", b"chunked")], b"1.1", 400),
        (b"POST", b"/", [(b"transfer-encoding", b"chunked")], b"1.0", 400),
        (b"POST", b"/", [(b"transfer-encoding", b"chunked")], b"1.1", None),
    ],
)
def test_refuse_request(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    version: bytes,
    status: int | None,
) -> None:
    refusal = wire.refuse_request(method, target, headers, version, 100, 60 * 1024)
    assert (refusal.status if refusal else None) == status


def test_upstream_failures_read_as_envoys_router_writes_them() -> None:
    """Status, body and details as Envoy 1.40 answers (parity: upstream-* scenarios)."""
    refused = wire.upstream_reset(
        wire.CONNECTION_FAILURE, "delayed connect error: Connection refused"
    )
    assert refused == wire.UpstreamFailure(
        503,
        b"upstream connect error or disconnect/reset before headers. reset reason:"
        b" remote connection failure",
        "upstream_reset_before_response_started"
        "{remote_connection_failure|delayed_connect_error:_Connection_refused}",
    )
    protocol = wire.upstream_reset(wire.PROTOCOL_ERROR)
    assert (protocol.status, protocol.details) == (
        502,
        "upstream_reset_before_response_started{protocol_error}",
    )
    assert wire.upstream_reset(wire.CONNECTION_TERMINATION).status == 503
