"""One HTTP exchange's conversation with an ext_proc processor, without any I/O.

The protocol (envoy.service.ext_proc.v3, external_processor.proto) in short: the proxy opens one
bidirectional stream per HTTP request and sends, as the processing mode asks, the request
headers, body and trailers, then the response headers, body and trailers. For each message sent
the processor answers with the matching response, in order; until it does, that part of the
HTTP exchange is held. A processor may instead answer with an immediate response, ending the
exchange with a local reply, or close the stream with OK to stop taking part.

Rules this module keeps:
1. Events go in through :meth:`Exchange.handle`, which returns the actions the I/O layer must
   carry out, in order. Nothing else changes the exchange's state.
2. A direction holds its message while it awaits a reply; it is released (``Forward*``) exactly
   once, mutated by the reply, or unmodified when the processor is out of the picture
   (fail-open, OK close).
3. Once processing is complete (immediate response, error, fail-open, OK close, nothing more
   to send) the stream is closed, later replies are ignored and later messages pass through.
4. Errors become local replies: ``status_on_error`` for gRPC errors, spurious replies and
   mutation errors; 504 for message timeouts; ``failure_mode_allow`` turns the first three
   classes (but never mutation errors) into fail-open.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core import codec
from extproc.core.mutations import apply_header_mutation
from extproc.core.settings import NONE, SEND, SKIP, ExchangeSettings
from extproc.models import Headers

CONTINUE_AND_REPLACE = ep.CommonResponse.CONTINUE_AND_REPLACE


class Direction(enum.Enum):
    REQUEST = "request"
    RESPONSE = "response"


class Awaiting(enum.Enum):
    IDLE = "idle"
    HEADERS = "headers"


# Inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHeadersReceived:
    headers: Headers
    end_of_stream: bool


@dataclass(frozen=True, slots=True)
class ResponseHeadersReceived:
    headers: Headers
    end_of_stream: bool


@dataclass(frozen=True, slots=True)
class ProcessorReplied:
    response: ep.ProcessingResponse


@dataclass(frozen=True, slots=True)
class ProcessorClosed:
    """The stream ended: ``code`` 0 is an OK close by the processor, anything else an error."""

    code: int
    details: str = ""


@dataclass(frozen=True, slots=True)
class MessageTimedOut:
    pass


Event = (
    RequestHeadersReceived
    | ResponseHeadersReceived
    | ProcessorReplied
    | ProcessorClosed
    | MessageTimedOut
)

# Outputs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendToProcessor:
    request: ep.ProcessingRequest


@dataclass(frozen=True, slots=True)
class ForwardHeaders:
    direction: Direction
    headers: Headers


@dataclass(frozen=True, slots=True)
class RespondLocally:
    """Answer the client with this reply instead of whatever the upstream would say."""

    status: int
    headers: Headers
    body: bytes
    details: str


@dataclass(frozen=True, slots=True)
class CloseStream:
    pass


Action = SendToProcessor | ForwardHeaders | RespondLocally | CloseStream

# State ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _DirectionState:
    awaiting: Awaiting = Awaiting.IDLE
    held: Headers | None = None
    end_of_stream: bool = False
    started: bool = False


@dataclass(slots=True)
class Outcome:
    """What the exchange did, for the access log and the stats."""

    messages_sent: int = 0
    messages_received: int = 0
    spurious: int = 0
    rejected_mutations: int = 0
    failed_open: bool = False
    timed_out: bool = False
    immediate_response: bool = False
    server_closed: bool = False
    stream_error: int | None = None
    details: str = ""


class Exchange:
    """The ext_proc state of one HTTP request/response exchange."""

    def __init__(self, settings: ExchangeSettings) -> None:
        self.settings = settings
        self.mode = settings.processing_mode
        self.complete = False
        self.stream_open = False
        self.outcome = Outcome()
        self._request = _DirectionState()
        self._response = _DirectionState()

    @property
    def awaiting_reply(self) -> bool:
        return not self.complete and (
            self._request.awaiting is not Awaiting.IDLE
            or self._response.awaiting is not Awaiting.IDLE
        )

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, RequestHeadersReceived):
            return self._on_headers(Direction.REQUEST, event.headers, event.end_of_stream)
        if isinstance(event, ResponseHeadersReceived):
            return self._on_headers(Direction.RESPONSE, event.headers, event.end_of_stream)
        if isinstance(event, ProcessorReplied):
            return self._on_reply(event.response)
        if isinstance(event, ProcessorClosed):
            return self._on_closed(event)
        return self._on_timeout()

    # Sending ----------------------------------------------------------------------------

    def _state(self, direction: Direction) -> _DirectionState:
        return self._request if direction is Direction.REQUEST else self._response

    def _on_headers(self, direction: Direction, headers: Headers, eos: bool) -> list[Action]:
        state = self._state(direction)
        state.started = True
        state.end_of_stream = eos
        header_mode = (
            self.mode.request_header_mode
            if direction is Direction.REQUEST
            else self.mode.response_header_mode
        )
        if self.complete or header_mode == SKIP:
            return [ForwardHeaders(direction, headers), *self._close_if_done()]
        state.awaiting = Awaiting.HEADERS
        state.held = headers
        message = codec.http_headers(headers, eos)
        if direction is Direction.REQUEST:
            request = ep.ProcessingRequest(request_headers=message)
        else:
            request = ep.ProcessingRequest(response_headers=message)
        return [self._send(request)]

    def _send(self, request: ep.ProcessingRequest) -> SendToProcessor:
        request.metadata_context.SetInParent()
        if not self.stream_open:
            self.stream_open = True
            request.protocol_config.request_body_mode = self.mode.request_body_mode
            request.protocol_config.response_body_mode = self.mode.response_body_mode
        self.outcome.messages_sent += 1
        return SendToProcessor(request)

    # Receiving --------------------------------------------------------------------------

    def _on_reply(self, response: ep.ProcessingResponse) -> list[Action]:
        if self.complete:
            return []
        if response.HasField("override_message_timeout"):
            # max_message_timeout is 0, so every override is out of range and ignored; the
            # processor still owes the real reply.
            return []
        kind = response.WhichOneof("response")
        if kind == "immediate_response" and not self.settings.disable_immediate_response:
            self.outcome.messages_received += 1
            return self._immediate(response.immediate_response)
        if kind == "request_headers" and self._request.awaiting is Awaiting.HEADERS:
            self.outcome.messages_received += 1
            return self._headers_reply(Direction.REQUEST, response.request_headers.response)
        if kind == "response_headers" and self._response.awaiting is Awaiting.HEADERS:
            self.outcome.messages_received += 1
            return self._headers_reply(Direction.RESPONSE, response.response_headers.response)
        self.outcome.spurious += 1
        if kind == "immediate_response":
            details = "unhandled_immediate_response_due_to_config_disabled_it"
        else:
            details = "spurious_message" if kind else "unhandled_message"
        return self._fail(self.settings.status_on_error, details)

    def _headers_reply(self, direction: Direction, common: ep.CommonResponse) -> list[Action]:
        state = self._state(direction)
        assert state.held is not None
        headers = state.held
        if common.HasField("header_mutation"):
            result = apply_header_mutation(
                headers,
                common.header_mutation,
                self.settings.rules,
                self.settings.limits,
                replacing=common.status == CONTINUE_AND_REPLACE,
                honor_append_action=self.settings.honor_append_action,
            )
            self.outcome.rejected_mutations += result.rejected
            if result.error:
                # Mutation errors never fail open (Envoy: failure_mode_allow does not apply).
                return self._finish(self._error_reply(self.settings.status_on_error, result.error))
        state.awaiting = Awaiting.IDLE
        state.held = None
        return [ForwardHeaders(direction, headers), *self._close_if_done()]

    def _immediate(self, immediate: ep.ImmediateResponse) -> list[Action]:
        self.outcome.immediate_response = True
        status = immediate.status.code if immediate.status.code >= 200 else 200
        headers = Headers([(b":status", str(status).encode())])
        if immediate.HasField("headers"):
            # Errors in these mutations are only logged by Envoy; the reply goes out anyway.
            result = apply_header_mutation(
                headers,
                immediate.headers,
                self.settings.rules,
                self.settings.limits,
                honor_append_action=self.settings.honor_append_action,
            )
            self.outcome.rejected_mutations += result.rejected
        status = int(headers.get(b":status") or status)
        body = immediate.body
        if body:
            headers.set(b"content-length", str(len(body)).encode())
            if b"content-type" not in headers:
                headers.set(b"content-type", b"text/plain")
        else:
            headers.remove(b"content-length")
            headers.remove(b"content-type")
        details = "_".join(immediate.details.split())
        return self._finish(RespondLocally(status, headers, body, details))

    def _on_closed(self, event: ProcessorClosed) -> list[Action]:
        if event.code != 0:
            self.outcome.stream_error = event.code
        if self.complete:
            return []
        if event.code == 0:
            self.outcome.server_closed = True
            return self._release_all()
        return self._fail(
            self.settings.status_on_error,
            f"ext_proc_error_gRPC_error_{event.code}{{{event.details}}}",
        )

    def _on_timeout(self) -> list[Action]:
        if self.complete:
            return []
        self.outcome.timed_out = True
        return self._fail(504, "ext_proc_error_per-message_timeout_exceeded")

    # Endings ----------------------------------------------------------------------------

    def _fail(self, status: int, details: str) -> list[Action]:
        if self.settings.failure_mode_allow:
            self.outcome.failed_open = True
            self.outcome.details = details
            return self._release_all()
        return self._finish(self._error_reply(status, details))

    def _error_reply(self, status: int, details: str) -> RespondLocally:
        headers = Headers([(b":status", str(status).encode())])
        return RespondLocally(status, headers, b"", details)

    def _finish(self, reply: RespondLocally) -> list[Action]:
        self.outcome.details = reply.details
        self._request.awaiting = self._response.awaiting = Awaiting.IDLE
        self._request.held = self._response.held = None
        self.complete = True
        return [CloseStream(), reply]

    def _release_all(self) -> list[Action]:
        actions: list[Action] = [CloseStream()]
        for direction in Direction:
            state = self._state(direction)
            if state.held is not None:
                actions.append(ForwardHeaders(direction, state.held))
            state.awaiting, state.held = Awaiting.IDLE, None
        self.complete = True
        return actions

    def _close_if_done(self) -> list[Action]:
        """Close the stream as soon as no message can follow (Envoy's close optimisation)."""
        if self.complete or not self.stream_open or self._more_to_send():
            return []
        self.complete = True
        return [CloseStream()]

    def _more_to_send(self) -> bool:
        mode = self.mode
        if (
            self._request.awaiting is not Awaiting.IDLE
            or self._response.awaiting is not Awaiting.IDLE
        ):
            return True
        if not self._request.end_of_stream and (
            mode.request_body_mode != NONE or mode.request_trailer_mode == SEND
        ):
            return True
        if not self._response.started:
            return mode.response_header_mode != SKIP or _sends_after_headers(
                mode.response_body_mode, mode.response_trailer_mode
            )
        return not self._response.end_of_stream and _sends_after_headers(
            mode.response_body_mode, mode.response_trailer_mode
        )


def _sends_after_headers(body_mode: int, trailer_mode: int) -> bool:
    return bool(body_mode != NONE or trailer_mode == SEND)
