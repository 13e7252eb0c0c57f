"""Request and response attributes for ``request_attributes`` / ``response_attributes``.

Envoy evaluates each configured CEL expression once per direction, on the first message of
that direction, and sends the results in ``ProcessingRequest.attributes`` under the key
``envoy.filters.http.ext_proc``: integers as numbers, booleans as bools, everything else as
CEL prints it (maps as ``"CelMap value"``, timestamps in RFC 3339 with ``+00:00``). An
expression with no value yet (``response.code`` during the request) is left out. extproc
supports the plain attribute names below; anything else is refused at start-up.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import struct_pb2

from extproc.models import Headers

ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


@dataclass(frozen=True, slots=True)
class Connection:
    """What the I/O layer knows of one exchange's connection, for attributes."""

    source: tuple[str, int] = ("", 0)
    destination: tuple[str, int] = ("", 0)
    upstream: tuple[str, int] | None = None
    connection_id: int = 0
    protocol: str = "HTTP/1.1"
    start: datetime.datetime = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


Value = str | float | bool
_Getter = Callable[[Headers, Connection], Value | None]


def _header(name: bytes) -> _Getter:
    def get(headers: Headers, conn: Connection) -> Value | None:
        value = headers.get(name)
        return None if value is None else value.decode("latin-1")

    return get


def _path(part: int) -> _Getter:
    def get(headers: Headers, conn: Connection) -> Value | None:
        path = (headers.get(b":path") or b"").decode("latin-1")
        pieces = path.split("?", 1)
        return pieces[part] if part < len(pieces) else ""

    return get


def _address(value: tuple[str, int] | None) -> str | None:
    if value is None or not value[0]:
        return None
    host = f"[{value[0]}]" if ":" in value[0] else value[0]
    return f"{host}:{value[1]}"


def rfc3339(moment: datetime.datetime) -> str:
    """As CEL prints a timestamp: trailing zeros of the fraction dropped, ``+00:00``."""
    text = moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return f"{text}.{fraction}+00:00" if fraction else f"{text}+00:00"


REQUEST: dict[str, _Getter] = {
    "request.path": _header(b":path"),
    "request.url_path": _path(0),
    "request.query": _path(1),
    "request.method": _header(b":method"),
    "request.scheme": _header(b":scheme"),
    "request.host": _header(b":authority"),
    "request.headers": lambda h, c: "CelMap value",
    "request.referer": _header(b"referer"),
    "request.useragent": _header(b"user-agent"),
    "request.id": _header(b"x-request-id"),
    "request.protocol": lambda h, c: c.protocol,
    "request.time": lambda h, c: rfc3339(c.start),
    "request.size": lambda h, c: 0.0,  # replaced in evaluate(): it needs the bytes read
    "source.address": lambda h, c: _address(c.source),
    "source.port": lambda h, c: float(c.source[1]),
    "destination.address": lambda h, c: _address(c.destination),
    "destination.port": lambda h, c: float(c.destination[1]),
    "connection.id": lambda h, c: float(c.connection_id),
    "connection.mtls": lambda h, c: False,
}
RESPONSE: dict[str, _Getter] = {
    "response.code": lambda h, c: float(h.get(b":status") or b"0"),
    "response.code_details": lambda h, c: "",  # replaced in evaluate(): it needs the details
    "response.headers": lambda h, c: "CelMap value",
    "response.flags": lambda h, c: 0.0,
    "upstream.address": lambda h, c: _address(c.upstream),
}
SUPPORTED = frozenset(REQUEST) | frozenset(RESPONSE)


def evaluate(
    names: tuple[str, ...],
    request: Headers,
    response: Headers | None,
    conn: Connection,
    request_bytes: int = 0,
    response_details: str = "via_upstream",
) -> struct_pb2.Struct:
    """The Struct of every named attribute that has a value now.

    ``request_bytes`` is how much request body was read so far: ``request.size`` is the
    content-length when there is one, else that (as Envoy counts it). ``response_details``
    is the response's code details: the upstream's response, or the proxy's reply for it.
    """
    out = struct_pb2.Struct()
    for name in names:
        if name == "request.size":
            length = request.get(b"content-length")
            size = int(length) if length is not None and length.isdigit() else request_bytes
            out.fields[name].number_value = float(size)
            continue
        if name == "response.code_details":
            if response is not None:
                out.fields[name].string_value = response_details
            continue
        getter, headers = (
            (REQUEST.get(name), request) if name in REQUEST else (RESPONSE.get(name), response)
        )
        if getter is None or headers is None:
            continue
        value = getter(headers, conn)
        if value is None:
            continue
        if isinstance(value, bool):
            out.fields[name].bool_value = value
        elif isinstance(value, float):
            out.fields[name].number_value = value
        else:
            out.fields[name].string_value = value
    return out
