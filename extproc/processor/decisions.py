"""Decisions a hook returns, and how each becomes the ``ProcessingResponse`` of its phase.

Envoy requires the reply to name the phase it answers (a ``request_headers`` message gets a
``request_headers`` reply); a decision is phase-free and :meth:`Decision.render` picks the
right field, so the same ``Mutate(...)`` works in any hook. Header values always go in
``raw_value``: Envoy reads nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import wrappers_pb2

HeaderValue: TypeAlias = str | bytes
HeaderItems: TypeAlias = Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]]

PHASES = (
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
)


def _raw(value: HeaderValue) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _items(headers: HeaderItems) -> list[tuple[str, HeaderValue]]:
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)


def header_options(headers: HeaderItems, *, append: bool) -> list[base_pb2.HeaderValueOption]:
    # Envoy's ext_proc honours only the legacy ``append`` bool (unset means overwrite), not
    # ``append_action``; it is set explicitly both ways so the intent reads in any dump.
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name.lower(), raw_value=_raw(value)),
            append=wrappers_pb2.BoolValue(value=append),
        )
        for name, value in _items(headers)
    ]


def processing_mode(**modes: str | int) -> processing_mode_pb2.ProcessingMode:
    """``processing_mode(response_body_mode="BUFFERED")``: enum values by name or number."""
    return processing_mode_pb2.ProcessingMode(**modes)


@dataclass(frozen=True)
class Decision:
    """Base of every decision: what all phases share (mode override, dynamic metadata)."""

    mode: processing_mode_pb2.ProcessingMode | None = field(default=None, kw_only=True)
    metadata: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, kw_only=True)

    def with_mode(self, **modes: str | int) -> Decision:
        return dataclasses.replace(self, mode=processing_mode(**modes))

    def with_metadata(self, namespace: str, values: Mapping[str, Any]) -> Decision:
        return dataclasses.replace(self, metadata={**self.metadata, namespace: dict(values)})

    def render(self, phase: str) -> ep.ProcessingResponse:
        """The reply to a message of ``phase`` (one of :data:`PHASES`)."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        reply = self._render(phase)
        if self.mode is not None:
            reply.mode_override.CopyFrom(self.mode)
        for namespace, values in self.metadata.items():
            reply.dynamic_metadata.fields[namespace].struct_value.update(dict(values))
        return reply

    def _render(self, phase: str) -> ep.ProcessingResponse:
        return _common(phase, ep.CommonResponse())


def _common(phase: str, common: ep.CommonResponse) -> ep.ProcessingResponse:
    reply = ep.ProcessingResponse()
    answer = getattr(reply, phase)
    answer.SetInParent()  # an empty phase reply is how the protocol says "continue"
    if phase.endswith("_trailers"):
        # A TrailersResponse has only a header mutation: nothing else can apply to trailers.
        if common.status or common.HasField("body_mutation"):
            raise ValueError(f"{phase}: only header mutations apply to trailers")
        if common.HasField("header_mutation"):
            answer.header_mutation.CopyFrom(common.header_mutation)
    elif common.ByteSize():
        answer.response.CopyFrom(common)
    return reply


@dataclass(frozen=True)
class Continue(Decision):
    """Let the message through unchanged."""


@dataclass(frozen=True)
class Mutate(Decision):
    """Change headers (or trailers) and/or the body, then continue.

    ``set_headers`` overwrite, ``append_headers`` add another value, ``remove_headers`` go
    first (Envoy applies removals before sets). ``body`` replaces the body (in a BUFFERED body
    hook also set ``content-length``), or this piece of it in STREAMED; ``clear_body`` empties
    it. Only header changes apply to trailers.
    """

    set_headers: HeaderItems = ()
    append_headers: HeaderItems = ()
    remove_headers: Iterable[str] = ()
    body: bytes | None = None
    clear_body: bool = False

    def _common(self) -> ep.CommonResponse:
        mutation = ep.HeaderMutation(
            set_headers=[
                *header_options(self.set_headers, append=False),
                *header_options(self.append_headers, append=True),
            ],
            remove_headers=[name.lower() for name in self.remove_headers],
        )
        common = ep.CommonResponse()
        if mutation.ByteSize():
            common.header_mutation.CopyFrom(mutation)
        if self.clear_body:
            common.body_mutation.clear_body = True
        elif self.body is not None:
            common.body_mutation.body = self.body
        return common

    def _render(self, phase: str) -> ep.ProcessingResponse:
        return _common(phase, self._common())


@dataclass(frozen=True)
class ReplaceAndContinue(Mutate):
    """``CONTINUE_AND_REPLACE`` from a headers hook: the mutation (may change ``:method``)
    and ``body`` replace the message, and the rest of that direction skips the processor."""

    def _render(self, phase: str) -> ep.ProcessingResponse:
        if not phase.endswith("_headers"):
            raise ValueError(f"ReplaceAndContinue answers a headers phase, not {phase}")
        common = self._common()
        common.status = ep.CommonResponse.CONTINUE_AND_REPLACE
        return _common(phase, common)


@dataclass(frozen=True)
class Respond(Decision):
    """Answer the HTTP request now (``ImmediateResponse``); the upstream is not (further) used."""

    status: int = 200
    body: bytes | str = b""
    headers: HeaderItems = ()
    details: str = ""
    grpc_status: int | None = None

    def _render(self, phase: str) -> ep.ProcessingResponse:
        immediate = ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=self.status),
            body=self.body.encode() if isinstance(self.body, str) else self.body,
            details=self.details,
        )
        options = header_options(self.headers, append=False)
        if options:
            immediate.headers.set_headers.extend(options)
        if self.grpc_status is not None:
            immediate.grpc_status.status = self.grpc_status
        return ep.ProcessingResponse(immediate_response=immediate)


def ModeOverride(**modes: str | int) -> Continue:  # noqa: N802 (reads as a decision)
    """Continue, and change the processing mode for the rest of the stream (``mode_override``;
    the proxy honours it only in a headers reply and with ``allow_mode_override``)."""
    return Continue(mode=processing_mode(**modes))


def with_mode(decision: Decision, **modes: str | int) -> Decision:
    return decision.with_mode(**modes)


def with_metadata(decision: Decision, namespace: str, values: Mapping[str, Any]) -> Decision:
    """Add ``dynamic_metadata`` under ``namespace`` (a plain dict becomes a Struct)."""
    return decision.with_metadata(namespace, values)


class RespondError(Exception):
    """Raise from any hook to answer the request with an ``ImmediateResponse``.

    Handy deep in helper code: ``raise RespondError(401, "no token", details="auth_missing")``.
    """

    def __init__(
        self,
        status: int,
        body: bytes | str = b"",
        *,
        headers: HeaderItems = (),
        details: str = "",
    ) -> None:
        super().__init__(f"{status} {details}".strip())
        self.response = Respond(status=status, body=body, headers=headers, details=details)


__all__ = [
    "PHASES",
    "Continue",
    "Decision",
    "ModeOverride",
    "Mutate",
    "ReplaceAndContinue",
    "Respond",
    "RespondError",
    "header_options",
    "processing_mode",
    "with_metadata",
    "with_mode",
]
