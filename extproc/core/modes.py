"""Processing-mode rules: what each body mode implies, and how mode_override merges.

Envoy 1.40 (docs/protocol.md, Bodies and trailers): header modes other than SKIP send;
trailer modes send only when SEND; ``mode_override`` starts from the filter-level mode, takes
each non-DEFAULT header or trailer mode and always both body modes from the override.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

SEND = ProcessingMode.SEND
SKIP = ProcessingMode.SKIP
DEFAULT = ProcessingMode.DEFAULT
NONE = ProcessingMode.NONE
STREAMED = ProcessingMode.STREAMED
BUFFERED = ProcessingMode.BUFFERED
BUFFERED_PARTIAL = ProcessingMode.BUFFERED_PARTIAL
FULL_DUPLEX_STREAMED = ProcessingMode.FULL_DUPLEX_STREAMED
GRPC = ProcessingMode.GRPC

STREAMING_MODES = frozenset({STREAMED, FULL_DUPLEX_STREAMED})
_HEADER_AND_TRAILER_FIELDS = (
    "request_header_mode",
    "response_header_mode",
    "request_trailer_mode",
    "response_trailer_mode",
)


def strips_content_length(body_mode: int, header_mode: int) -> bool:
    """Whether Envoy removes content-length from the head in this mode (docs/protocol.md,
    Bodies and trailers)."""
    if body_mode in (STREAMED, BUFFERED_PARTIAL, FULL_DUPLEX_STREAMED):
        return True
    return bool(body_mode == BUFFERED and header_mode == SKIP)


def sends_nothing(mode: ProcessingMode) -> bool:
    """Whether no message of an exchange in this mode ever goes to the processor (no reply can
    then override the mode either)."""
    return bool(
        mode.request_header_mode == SKIP
        and mode.response_header_mode == SKIP
        and mode.request_body_mode == NONE
        and mode.response_body_mode == NONE
        and mode.request_trailer_mode != SEND
        and mode.response_trailer_mode != SEND
    )


def merge_override(base: ProcessingMode, override: ProcessingMode) -> ProcessingMode:
    merged = ProcessingMode()
    merged.CopyFrom(base)
    for name in _HEADER_AND_TRAILER_FIELDS:
        value = getattr(override, name)
        if value != DEFAULT:
            setattr(merged, name, value)
    merged.request_body_mode = override.request_body_mode
    merged.response_body_mode = override.response_body_mode
    return merged


def override_allowed(merged: ProcessingMode, allowed: Sequence[ProcessingMode]) -> bool:
    """An empty allow-list admits anything; else one entry must match all but the request
    header mode, which an override cannot change anyway."""
    if not allowed:
        return True
    fields = [f for f in _HEADER_AND_TRAILER_FIELDS if f != "request_header_mode"]
    fields += ["request_body_mode", "response_body_mode"]
    return any(all(getattr(merged, f) == getattr(a, f) for f in fields) for a in allowed)
