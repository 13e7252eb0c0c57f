"""The :class:`Processor` hooks and the views they receive.

Nothing here does I/O: :mod:`extproc.processor.dispatch` feeds messages to the hooks, and
:mod:`extproc.processor.service` (gRPC) or :mod:`extproc.processor.testing` (no network) feeds
the dispatcher.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.processor.decisions import Decision

# What a hook may return: a decision, a raw reply for those who know the protocol, or None
# (the same as Continue()).
HookResult: TypeAlias = Decision | ep.ProcessingResponse | None


def _text(raw: bytes) -> str:
    # Header values are bytes on the wire; latin-1 maps every byte to one character, so no
    # value can fail to decode and ``.encode("latin-1")`` gives the exact bytes back.
    return raw.decode("latin-1")


class Headers(Mapping[str, str]):
    """A read-only view of a ``HeaderMap``, by lower-case name, over ``raw_value``.

    Envoy sends values in ``raw_value`` only (``value`` is empty), so that is what is read.
    ``headers["x"]`` and ``get`` give the first value; ``get_all`` every value in order.
    """

    __slots__ = ("_pairs",)

    def __init__(self, header_map: base_pb2.HeaderMap | None = None) -> None:
        entries = header_map.headers if header_map is not None else []
        self._pairs: tuple[tuple[str, str], ...] = tuple(
            (h.key.lower(), _text(h.raw_value) if h.raw_value else h.value) for h in entries
        )

    @classmethod
    def of(cls, pairs: Mapping[str, str] | list[tuple[str, str]]) -> Headers:
        """Build a view from plain pairs (for tests and for :mod:`testing`)."""
        items = list(pairs.items()) if isinstance(pairs, Mapping) else pairs
        header_map = base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode("latin-1")) for k, v in items]
        )
        return cls(header_map)

    def __getitem__(self, name: str) -> str:
        wanted = name.lower()
        for key, value in self._pairs:
            if key == wanted:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        # Each name once, in first-seen order, as a Mapping must.
        return iter(dict.fromkeys(key for key, _ in self._pairs))

    def __len__(self) -> int:
        return len({key for key, _ in self._pairs})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(key == name.lower() for key, _ in self._pairs)

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self._pairs if key == wanted]

    def pairs(self) -> list[tuple[str, str]]:
        """Every entry in order, repeated names kept."""
        return list(self._pairs)

    def __repr__(self) -> str:
        return f"Headers({list(self._pairs)!r})"


@dataclass(frozen=True, slots=True)
class Body:
    """One body message: the whole body (BUFFERED) or one piece of it (STREAMED)."""

    data: bytes
    end_of_stream: bool


@dataclass(slots=True)
class StreamContext:
    """What the SDK knows about one HTTP request, shared by every hook of its stream.

    A new one is made for each ``Process`` stream, i.e. each HTTP request. ``state`` is yours:
    put whatever the later phases need (the response hooks see what the request hooks stored).
    """

    state: dict[str, Any] = field(default_factory=dict)
    request_headers: Headers | None = None
    response_headers: Headers | None = None
    method: str = ""
    path: str = ""
    authority: str = ""
    scheme: str = ""
    request_id: str = ""
    status: int = 0
    # ``attributes`` from every message so far, by namespace (usually
    # ``envoy.filters.http.ext_proc``), converted from Struct to plain Python values.
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # ``metadata_context.filter_metadata`` of the latest message that carried any.
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    observability_mode: bool = False
    # gRPC metadata the proxy sent with the stream (``initial_metadata``), empty in tests.
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class Processor:
    """Subclass and override the hooks you need; every default lets the message through.

    Each hook returns a decision from :mod:`extproc.processor.decisions`, a raw
    ``ProcessingResponse`` (sent as is), or None (continue). Raising
    :class:`~extproc.processor.decisions.RespondError` answers the request itself; any other
    exception ends the stream with a gRPC INTERNAL error carrying its message.

    A hook is only called for the phases the proxy's ``processing_mode`` sends.
    """

    def on_request_headers(self, ctx: StreamContext, headers: Headers) -> HookResult:
        return None

    def on_request_body(self, ctx: StreamContext, body: Body) -> HookResult:
        return None

    def on_request_trailers(self, ctx: StreamContext, trailers: Headers) -> HookResult:
        return None

    def on_response_headers(self, ctx: StreamContext, headers: Headers) -> HookResult:
        return None

    def on_response_body(self, ctx: StreamContext, body: Body) -> HookResult:
        return None

    def on_response_trailers(self, ctx: StreamContext, trailers: Headers) -> HookResult:
        return None
