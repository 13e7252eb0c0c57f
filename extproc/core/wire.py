"""HTTP/1.1 wire heads <-> the HTTP/2-style header maps the ext_proc exchange works on.

Owns what a proxy must do to a head crossing it: hop-by-hop headers dropped (RFC 9110 §7.6.1),
the request line and Host folded into pseudo-headers and back, X-Forwarded-* and X-Request-Id
added as Envoy's connection manager adds them, and message framing recomputed from the body
actually sent, so that no header a processor sets can desynchronise the framing on the wire.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

from extproc.core.record import envoy_details
from extproc.models import Header, Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"transfer-encoding",
        b"upgrade",
    }
)


# What h11 lets through but no proxy should forward: control characters other than HTAB in a
# value or target (h11 refuses only NUL and whitespace), a Host that is no authority.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
_AUTHORITY = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]@]*").fullmatch


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the proxy answers itself, before anything reaches the processor or upstream."""

    status: int
    reason: str


def refuse_request(
    method: bytes,
    target: bytes,
    headers: Sequence[Header],
    http_version: bytes,
    max_count: int,
    max_bytes: int,
) -> Refusal | None:
    """Why a request h11 accepted must still not be forwarded, or None.

    h11 has already refused malformed lines, NUL, bare CR, conflicting Content-Lengths and
    unknown transfer codings; this adds the rest of RFC 9112's smuggling rules (Content-Length
    with Transfer-Encoding, Transfer-Encoding in HTTP/1.0), the request-target forms a gateway
    may forward, and Envoy's header count and size limits, which h11 checks only on a head
    still incomplete after a read.
    """
    if http_version != b"1.1" and http_version != b"1.0":
        return Refusal(505, "HTTP version not supported")
    if method == b"CONNECT":
        return Refusal(405, "CONNECT is not supported")
    if target[:1] != b"/" and not (
        (target == b"*" and method == b"OPTIONS")
        or target[:7].lower() == b"http://"
        or target[:8].lower() == b"https://"
    ):
        return Refusal(400, "invalid request target")
    if b"#" in target or _CONTROL(target):
        return Refusal(400, "invalid character in the request target")
    # Lists and one joined search, not a loop of checks: this runs for every request.
    names = [n for n, _ in headers]
    values = [v for _, v in headers]
    joined = b"\t".join(values)  # HTAB is allowed in values, so it cannot cause a refusal
    if _CONTROL(joined):
        return Refusal(400, "invalid character in a header value")
    if len(names) > max_count or sum(map(len, names)) + sum(map(len, values)) > max_bytes:
        return Refusal(431, "request headers too large")
    if b"host" in names and not _AUTHORITY(values[names.index(b"host")]):
        return Refusal(400, "invalid Host")
    if b"transfer-encoding" in names and (b"content-length" in names or http_version == b"1.0"):
        return Refusal(400, "Transfer-Encoding with Content-Length or in HTTP/1.0")
    return None


def trailers_are_clean(trailers: Sequence[Header]) -> bool:
    """Whether no trailer value holds a control character h11 let through (what a request's
    head is refused for, 400, in :func:`refuse_request`)."""
    return not _CONTROL(b"\t".join(v for _, v in trailers))


@dataclass(frozen=True, slots=True)
class IngressOptions:
    scheme: bytes = b"http"
    forwarded_for: bool = True
    default_authority: bytes = b""
    # The X-Request-Id of a request that came without one.
    new_request_id: Callable[[], bytes] = lambda: str(uuid.uuid4()).encode()


def _connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def strip_hop_by_hop(headers: Iterable[Header]) -> list[Header]:
    """The end-to-end headers only; names must already be lower-case (h11 gives them so).

    ``TE: trailers`` is end-to-end in effect and kept, as Envoy keeps it.
    """
    headers = list(headers)
    named = _connection_tokens(headers)
    return [
        (n, v)
        for n, v in headers
        if (n not in HOP_BY_HOP and n not in named) or (n == b"te" and v.lower() == b"trailers")
    ]


def request_from_wire(
    method: bytes,
    target: bytes,
    wire_headers: Iterable[Header],
    peer_ip: str,
    options: IngressOptions,
) -> Headers:
    """The request as the processor and the mutation rules see it."""
    wire = list(wire_headers)
    authority = options.default_authority
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        # absolute-form (RFC 9112 §3.2.2): the authority comes from the target, not Host.
        rest = target.split(b"://", 1)[1]
        authority, slash, path = rest.partition(b"/")
        target = slash + path or b"/"
        wire = [h for h in wire if h[0] != b"host"]
    kept: list[Header] = []
    for name, value in strip_hop_by_hop(wire):
        if name == b"host":
            authority = value
        elif name != b"expect" or value.lower() != b"100-continue":
            # The proxy answers 100-continue itself and drops the header, as Envoy does.
            kept.append((name, value))
    headers = Headers(
        [
            (b":authority", authority),
            (b":path", target),
            (b":method", method),
            (b":scheme", options.scheme),
            *kept,
        ]
    )
    if options.forwarded_for:
        previous = headers.get(b"x-forwarded-for")
        ip = peer_ip.encode()
        headers.set(b"x-forwarded-for", previous + b"," + ip if previous else ip)
        headers.set(b"x-forwarded-proto", options.scheme)
    elif b"x-forwarded-proto" not in headers:
        headers.add(b"x-forwarded-proto", options.scheme)
    if b"x-request-id" not in headers:
        headers.add(b"x-request-id", options.new_request_id())
    return headers


def response_from_wire(status: int, wire_headers: Iterable[Header]) -> Headers:
    """The response as the processor sees it.

    Envoy strips a response's hop-by-hop headers only after its filter chain, so processors
    see the upstream's Connection and Transfer-Encoding; only Keep-Alive is gone by then.
    They are stripped on the way out (:func:`response_to_wire`).
    """
    kept = [h for h in wire_headers if h[0] != b"keep-alive"]
    return Headers([(b":status", str(status).encode()), *kept])


_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")


def request_to_wire(
    headers: Headers, body_length: int | None, has_body: bool
) -> tuple[bytes, bytes, list[Header]]:
    """Method, target and wire headers for the upstream request.

    ``body_length`` is the exact length of the body that will be sent, or None when it will
    be sent chunked. A bodiless request keeps only a ``Content-Length: 0``, and gets one when
    its method may carry a body, as Envoy's codec writes it (an origin may answer a POST
    without any framing with 411).
    """
    method = headers.get(b":method") or b""
    length = b"0" if not has_body else None if body_length is None else str(body_length).encode()
    wire: list[Header] = [(b"host", headers.get(b":authority") or b"")]
    wire += _with_length(
        [h for h in headers.regular() if h[0] != b"host"],
        length,
        add=length is not None and (has_body or may_have_body(method)),
    )
    if has_body and body_length is None:
        wire.append((b"transfer-encoding", b"chunked"))
    return method, headers.get(b":path") or b"", wire


def may_have_body(method: bytes) -> bool:
    """Whether a request with this method may carry a body: when it has none, it is framed
    with ``Content-Length: 0`` (Envoy's HeaderUtility::requestShouldHaveNoBody)."""
    return method not in _BODILESS_METHODS


_BODILESS_METHODS = frozenset((b"GET", b"HEAD", b"DELETE", b"TRACE", b"CONNECT"))


def _with_length(headers: list[Header], length: bytes | None, add: bool) -> list[Header]:
    """``headers`` with Content-Length set to ``length`` where it stood (dropped if None)."""
    out: list[Header] = []
    for name, value in headers:
        if name == b"content-length":
            if length is not None:
                out.append((name, length))
                length, add = None, False
        elif name != b"transfer-encoding":
            out.append((name, value))
    if add and length is not None:
        out.append((b"content-length", length))
    return out


def response_to_wire(
    headers: Headers, body_length: int | None, body_allowed: bool
) -> tuple[int, bytes, list[Header]]:
    """Status, reason and wire headers for the downstream response.

    When the response may carry a body, Content-Length is set from the body actually sent;
    an unknown length leaves framing to h11 (chunked, or close-delimited for HTTP/1.0).
    A response that cannot carry one (HEAD, 204, 304) keeps its Content-Length as it is.
    """
    status = int(headers.get(b":status") or b"502")
    wire = strip_hop_by_hop(headers.regular())
    if body_allowed:
        length = None if body_length is None else str(body_length).encode()
        wire = _with_length(wire, length, add=True)
    else:
        wire = _first_valid_length(wire)
    return status, reason_phrase(status), wire


def _first_valid_length(headers: list[Header]) -> list[Header]:
    """A bodiless response's headers with at most one Content-Length, and only a number:
    a processor's junk there would otherwise make a head no HTTP/1.1 parser accepts."""
    seen = False
    out: list[Header] = []
    for name, value in headers:
        if name == b"content-length":
            if seen or not value.isdigit():
                continue
            seen = True
        out.append((name, value))
    return out


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """The reply Envoy's router makes in the upstream's place, with its response code details."""

    status: int
    body: bytes
    details: str


# Envoy's reset reasons (StreamResetReason, as the router prints them) for an upstream that
# failed before its response head.
CONNECTION_FAILURE = "remote connection failure"  # the connection was refused, or failed
CONNECTION_TIMEOUT = "connection timeout"
CONNECTION_TERMINATION = "connection termination"  # it closed or reset before its head
PROTOCOL_ERROR = "protocol error"  # what it sent is not an HTTP/1.1 response head

UPSTREAM_TIMEOUT = UpstreamFailure(504, b"upstream request timeout", "response_timeout")


def upstream_reset(reason: str, transport_failure: str = "") -> UpstreamFailure:
    """Envoy's reply to an upstream that failed before its response head for ``reason``: 503,
    or 502 for a protocol error; ``transport_failure`` is the connect error in the details
    (``delayed connect error: Connection refused``)."""
    status = 502 if reason == PROTOCOL_ERROR else 503
    body = f"upstream connect error or disconnect/reset before headers. reset reason: {reason}"
    inner = f"{reason}|{transport_failure}" if transport_failure else reason
    details = "upstream_reset_before_response_started{" + envoy_details(inner) + "}"
    return UpstreamFailure(status, body.encode(), details)


def request_line_is_valid(method: bytes, target: bytes) -> bool:
    """Whether HTTP/1.1 can carry this request line (a token method, a visible-ASCII target).

    A processor can set ``:path`` and ``:method`` to anything; Envoy's codec refuses to encode
    such a request and answers 503, and so does the proxy.
    """
    return bool(_METHOD.fullmatch(method)) and bool(_TARGET.fullmatch(target))


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def request_body_framing(wire_headers: Iterable[Header]) -> tuple[bool, int | None]:
    """Whether a request has a body and its length (None when chunked), from h11's headers.

    h11 has already refused a request with conflicting or invalid framing.
    """
    length: int | None = 0
    for name, value in wire_headers:
        if name == b"transfer-encoding":
            return True, None
        if name == b"content-length":
            length = int(value)
    return bool(length), length


def response_body_length(wire_headers: Iterable[Header]) -> int | None:
    """The length a response's framing announces; None for chunked or close-delimited."""
    length = None
    for name, value in wire_headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)
    return length


def response_may_have_body(status: int, request_method: bytes) -> bool:
    return request_method != b"HEAD" and status >= 200 and status not in (204, 304)
