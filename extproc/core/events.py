"""What goes into an ext_proc exchange (events) and what comes out of it (actions).

Inputs are noun phrases of what happened; outputs are verbs of what the I/O layer must do.
All are frozen: the exchange never changes one after handing it out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.models import Headers


class Direction(enum.Enum):
    REQUEST = "request"
    RESPONSE = "response"


# Inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeadersReceived:
    direction: Direction
    headers: Headers
    end_of_stream: bool


@dataclass(frozen=True, slots=True)
class BodyReceived:
    """Body bytes as read (one chunk per read); ``end_of_stream`` when no trailers follow."""

    direction: Direction
    data: bytes
    end_of_stream: bool


@dataclass(frozen=True, slots=True)
class TrailersReceived:
    direction: Direction
    trailers: Headers


@dataclass(frozen=True, slots=True)
class ProcessorReplied:
    response: ep.ProcessingResponse


@dataclass(frozen=True, slots=True)
class ProcessorClosed:
    """The stream ended: ``code`` 0 is an OK close by the processor, anything else an error."""

    code: int
    details: str = ""


@dataclass(frozen=True, slots=True)
class ProcessorHttpFailed:
    """An http_service processor's POST failed: not 200, no JSON ProcessingResponse in the
    body, its connection lost, or its http_uri.timeout passed. ``reason`` says which."""

    reason: str


@dataclass(frozen=True, slots=True)
class MessageTimedOut:
    pass


Event = (
    HeadersReceived
    | BodyReceived
    | TrailersReceived
    | ProcessorReplied
    | ProcessorClosed
    | ProcessorHttpFailed
    | MessageTimedOut
)

# Outputs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendToProcessor:
    """Send ``request``; when ``timed``, its reply is due within message_timeout."""

    request: ep.ProcessingRequest
    timed: bool = True


@dataclass(frozen=True, slots=True)
class ForwardHeaders:
    """Send the head on. ``body_length`` is the exact length of the body that will follow,
    or None when it is not known in advance (send it chunked)."""

    direction: Direction
    headers: Headers
    end_of_stream: bool
    body_length: int | None


@dataclass(frozen=True, slots=True)
class ForwardBody:
    direction: Direction
    data: bytes
    end_of_stream: bool


@dataclass(frozen=True, slots=True)
class ForwardTrailers:
    direction: Direction
    trailers: Headers


@dataclass(frozen=True, slots=True)
class RespondLocally:
    """Answer the client with this reply instead of whatever the upstream would say."""

    status: int
    headers: Headers
    body: bytes
    details: str


@dataclass(frozen=True, slots=True)
class RespondFromProxy:
    """Answer in the upstream's place, as Envoy's core does (413 for a body over the limit):
    unlike :class:`RespondLocally`, the reply still goes through the response phase."""

    status: int
    body: bytes
    details: str


@dataclass(frozen=True, slots=True)
class RestartTimer:
    """The processor's override_message_timeout: the outstanding message is now due in
    ``timeout`` seconds from now."""

    timeout: float


@dataclass(frozen=True, slots=True)
class CloseStream:
    pass


Action = (
    SendToProcessor
    | ForwardHeaders
    | ForwardBody
    | ForwardTrailers
    | RespondLocally
    | RespondFromProxy
    | RestartTimer
    | CloseStream
)
