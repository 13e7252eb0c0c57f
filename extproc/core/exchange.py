"""One HTTP exchange's conversation with an ext_proc processor, without any I/O.

The protocol (envoy.service.ext_proc.v3, external_processor.proto) in short: the proxy opens one
bidirectional stream per HTTP request and sends, as the processing mode asks, the request
headers, body and trailers, then the response headers, body and trailers. For each message sent
the processor answers with the matching response, in order (in FULL_DUPLEX_STREAMED it streams
the body back as it likes); until it does, that part of the HTTP exchange is held. A processor
may instead answer with an immediate response, ending the exchange with a local reply, or close
the stream with OK to stop taking part.

Rules this module keeps:
1. Events go in through :meth:`Exchange.handle`, which returns the actions the I/O layer must
   carry out, in order. Nothing else changes the exchange's state.
2. Each direction forwards its head once, then body bytes in order, then its end (the last body
   action's ``end_of_stream`` or trailers) once. What a processor holds is released exactly
   once: mutated by its reply, or unmodified when the processor is out of the picture.
3. Once processing is complete (immediate response, error, fail-open, OK close, nothing more
   to send) the stream is closed, later replies are ignored and later input passes through.
4. Errors become local replies: ``status_on_error`` for gRPC errors, spurious replies and
   mutation errors; 504 for message timeouts; 413/500 for bodies over the buffer limit.
   ``failure_mode_allow`` turns the first three into fail-open, except mutation errors and
   once FULL_DUPLEX_STREAMED body data went to the processor.
5. The I/O layer reads a direction's input only while :meth:`Exchange.wants_input` says so;
   that is how bodies are held behind a pending reply with bounded memory.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format, struct_pb2

from extproc.core import attributes, codec, modes
from extproc.core.events import (
    Action,
    BodyReceived,
    CloseStream,
    Direction,
    Event,
    ForwardBody,
    ForwardHeaders,
    ForwardTrailers,
    HeadersReceived,
    ProcessorClosed,
    ProcessorHttpFailed,
    ProcessorReplied,
    RespondFromProxy,
    RespondLocally,
    RestartTimer,
    SendToProcessor,
    TrailersReceived,
)
from extproc.core.mutations import apply_header_mutation
from extproc.core.record import Ending, RequestRecord, envoy_details
from extproc.core.settings import ExchangeSettings
from extproc.models import Header, Headers

CONTINUE_AND_REPLACE = ep.CommonResponse.CONTINUE_AND_REPLACE
ERR_LENGTH_MISMATCH = "mismatch_between_content_length_and_the_length_of_the_mutated_body"
# Envoy's details for any failed POST of the HTTP transport (not 200, bad JSON, timeout, reset).
_HTTP_ERROR = "ext_proc_error_HTTP_ERROR"
# Envoy's errors for a body reply of the wrong kind while streamed body replies are awaited.
SPURIOUS_NORMAL_BODY = (
    "spurious message: Normal body mutation response is received while body_mode_ is "
    "FULL_DUPLEX_STREAMED"
)
SPURIOUS_STREAMED_BODY = (
    "spurious message: streamed_response is received while body_mode_ is not FULL_DUPLEX_STREAMED"
)


class Awaiting(enum.Enum):
    IDLE = "idle"
    HEADERS = "headers"
    BODY = "body"  # BUFFERED: the whole body was sent
    PARTIAL = "partial"  # BUFFERED_PARTIAL: the first part was sent
    STREAMED = "streamed"  # STREAMED chunks outstanding
    TRAILERS = "trailers"


@dataclass(frozen=True, slots=True)
class _Fields:
    """The ProcessingRequest fields of one direction's messages."""

    headers: str
    body: str
    trailers: str


_FIELDS = {
    d: _Fields(f"{d.value}_headers", f"{d.value}_body", f"{d.value}_trailers") for d in Direction
}


@dataclass(slots=True)
class _Side:
    """One direction's state."""

    direction: Direction
    body_mode: int
    trailer_mode: int
    awaiting: Awaiting = Awaiting.IDLE
    started: bool = False
    headers_eos: bool = False
    held: Headers | None = None  # the head, until released
    released: bool = False
    strip_length: bool = False
    original_length: int | None = None
    input_done: bool = False
    output_done: bool = False
    buffer: bytearray = field(default_factory=bytearray)
    chunks: deque[tuple[bytes, bool]] = field(default_factory=deque)
    outstanding: int = 0  # STREAMED bytes sent and not yet answered
    trailers: Headers | None = None  # arrived, not yet sent or forwarded
    body_done: bool = False  # the processed part is answered; the rest passes through
    attributes_sent: bool = False
    bytes_received: int = 0
    first_headers: Headers | None = None  # as received, for attributes
    discard: bool = False  # CONTINUE_AND_REPLACE replaced the body: drop the original
    duplex_data_sent: bool = False
    early: bool = False  # body data or its end came while the headers reply was pending

    @property
    def fields(self) -> _Fields:
        return _FIELDS[self.direction]

    @property
    def passthrough(self) -> bool:
        return self.body_mode == modes.NONE or self.body_done


class Exchange:
    """The ext_proc state of one HTTP request/response exchange."""

    def __init__(
        self,
        settings: ExchangeSettings,
        connection: Callable[[], attributes.Connection] | None = None,
        record: RequestRecord | None = None,
    ) -> None:
        self.settings = settings
        # Asked for only when attributes are sent: most exchanges never build it.
        self._connection_source = connection
        self._connection: attributes.Connection | None = None
        # Where the exchange writes what it did (the I/O side writes the rest).
        self.record = record if record is not None else RequestRecord()
        self.observing = settings.observability_mode
        self.mode = settings.processing_mode
        self.complete = False
        self.stream_open = False
        self._timer_running = False
        self._timer_overridden = False
        mode = self.mode
        self._sides = {
            Direction.REQUEST: _Side(
                Direction.REQUEST, mode.request_body_mode, mode.request_trailer_mode
            ),
            Direction.RESPONSE: _Side(
                Direction.RESPONSE, mode.response_body_mode, mode.response_trailer_mode
            ),
        }

    # Queries for the I/O layer ------------------------------------------------------------

    @property
    def awaiting_reply(self) -> bool:
        return not self.complete and any(
            s.awaiting is not Awaiting.IDLE or s.chunks or _duplex_pending(s)
            for s in self._sides.values()
        )

    @property
    def timer_running(self) -> bool:
        """Whether a sent message's reply is due within message_timeout (Envoy stops the
        timer on every reply it processes and starts it on every timed send)."""
        return self._timer_running and not self.complete

    @property
    def streams_replies(self) -> bool:
        """Whether replies may arrive while input is still being read (STREAMED, duplex)."""
        return self.observing or any(
            s.body_mode in modes.STREAMING_MODES and not s.input_done for s in self._sides.values()
        )

    def wants_input(self, direction: Direction) -> bool:
        """Whether the I/O layer should read more of this direction's body now."""
        side = self._sides[direction]
        if side.input_done:
            return False
        if self.observing:
            return side.released
        if self.complete or side.discard or side.passthrough:
            return side.released or side.discard
        if side.awaiting is Awaiting.HEADERS:
            return side.body_mode == modes.FULL_DUPLEX_STREAMED or (
                side.body_mode == modes.STREAMED
                and self.settings.send_body_without_waiting_for_header_response
            )
        if side.awaiting in (Awaiting.BODY, Awaiting.PARTIAL, Awaiting.TRAILERS):
            return False
        # STREAMED flow control: stop reading while too much is unanswered.
        return side.outstanding <= self.settings.buffer_limit

    def takes_arrived_input(self, direction: Direction) -> bool:
        """Whether body data that has already arrived should be fed now, before the reply
        being awaited: STREAMED waits for the headers reply before it sends any body, and
        Envoy then sends what came meanwhile as one message (a whole body with its end, and
        BUFFERED semantics). Up to the buffer limit, as Envoy's watermark stops reading."""
        side = self._sides[direction]
        return (
            side.awaiting is Awaiting.HEADERS
            and self._early_body(side)
            and not side.input_done
            and len(side.buffer) <= self.settings.buffer_limit
        )

    def _early_body(self, side: _Side) -> bool:
        """Whether body data fed while the headers reply is pending is held for after it."""
        return (
            side.body_mode == modes.STREAMED
            and not self.complete
            and not self.observing
            and not self.settings.send_body_without_waiting_for_header_response
        )

    def forwards_body_as_read(self, direction: Direction) -> bool:
        """Whether each body piece read now goes out at once, with no processor reply
        awaited in between (the I/O layer may then write the head and body together)."""
        side = self._sides[direction]
        return (
            side.released
            and not side.discard
            and (self.complete or self.observing or side.passthrough)
        )

    def output_done(self, direction: Direction) -> bool:
        return self._sides[direction].output_done

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, HeadersReceived):
            return self._on_headers(
                self._sides[event.direction], event.headers, event.end_of_stream
            )
        if isinstance(event, BodyReceived):
            return self._on_body(self._sides[event.direction], event.data, event.end_of_stream)
        if isinstance(event, TrailersReceived):
            return self._on_trailers(self._sides[event.direction], event.trailers)
        if isinstance(event, ProcessorReplied):
            return self._on_reply(event.response)
        if isinstance(event, ProcessorClosed):
            return self._on_closed(event)
        if isinstance(event, ProcessorHttpFailed):
            return self._on_http_failed(event)
        return self._on_timeout()

    # Input --------------------------------------------------------------------------------

    def _header_mode(self, side: _Side) -> int:
        if side.direction is Direction.REQUEST:
            return int(self.mode.request_header_mode)
        return int(self.mode.response_header_mode)

    def _on_headers(self, side: _Side, headers: Headers, eos: bool) -> list[Action]:
        side.started = True
        side.headers_eos = side.input_done = eos
        length = headers.get(b"content-length")
        side.original_length = int(length) if length is not None and length.isdigit() else None
        header_mode = self._header_mode(side)
        # Observability mode leaves the message as it is: nothing is held or replaced.
        side.strip_length = not self.observing and modes.strips_content_length(
            side.body_mode, header_mode
        )
        if self.settings.request_attributes or self.settings.response_attributes:
            side.first_headers = headers.copy()
        if self.complete or header_mode == modes.SKIP:
            if not self.complete and side.strip_length:
                headers.remove(b"content-length")
            return [*self._release(side, headers), *self._close_if_done()]
        message = codec.headers_request(side.fields.headers, self._visible(headers), eos)
        actions: list[Action] = [self._send(side, message)]
        if side.strip_length:
            # Removed after the message was built: the processor still sees the original.
            headers.remove(b"content-length")
        if self.observing:
            return [*actions, *self._release(side, headers)]
        side.awaiting = Awaiting.HEADERS
        side.held = headers
        return actions

    def _observe_body(self, side: _Side, data: bytes, eos: bool) -> list[Action]:
        """Observability mode: only STREAMED bodies are sent, and nothing waits (docs/protocol.md,
        Control)."""
        actions: list[Action] = []
        if side.body_mode == modes.STREAMED and not self.complete:
            message = codec.body_request(side.fields.body, data, eos)
            actions.append(self._send(side, message, timed=False))
        return [*actions, *self._forward_body(side, data, eos)]

    def _visible(self, headers: Headers) -> Iterable[Header]:
        """What forward_rules let the processor see of a header map."""
        rules = self.settings.forward_rules
        return headers if rules is None else rules.filter(headers)

    def _on_body(self, side: _Side, data: bytes, eos: bool) -> list[Action]:
        side.input_done = eos
        side.bytes_received += len(data)
        return self._body(side, data, eos)

    def _body(self, side: _Side, data: bytes, eos: bool) -> list[Action]:
        if side.discard:
            # A replaced body: the original's bytes are dropped, its end still ends ours.
            return self._forward_body(side, b"", True) if eos and not side.output_done else []
        if not data and not eos:
            return []
        if self.observing:
            return self._observe_body(side, data, eos)
        if self.complete or side.passthrough:
            return self._forward_body(side, data, eos)
        mode = side.body_mode
        if side.awaiting is Awaiting.HEADERS and self._early_body(side):
            side.early = True
            side.buffer += data  # taken up by the headers reply (see _early_reply)
            return []
        if mode == modes.BUFFERED:
            return self._buffer(side, data, eos)
        if mode == modes.BUFFERED_PARTIAL:
            return self._buffer_partial(side, data, eos)
        message = codec.body_request(side.fields.body, data, eos)
        if mode == modes.FULL_DUPLEX_STREAMED:
            side.duplex_data_sent = True
            return [self._send(side, message, timed=False)]
        side.chunks.append((data, eos))
        side.outstanding += len(data)
        if side.awaiting is Awaiting.IDLE:
            side.awaiting = Awaiting.STREAMED
        return [self._send(side, message)]

    def _buffer(self, side: _Side, data: bytes, eos: bool) -> list[Action]:
        side.buffer += data
        if len(side.buffer) > self.settings.buffer_limit:
            return self._overflow(side)
        if not eos:
            return []
        return self._send_buffered(side, end_of_stream=True)

    def _send_buffered(self, side: _Side, end_of_stream: bool) -> list[Action]:
        side.awaiting = Awaiting.BODY if side.body_mode == modes.BUFFERED else Awaiting.PARTIAL
        message = codec.body_request(side.fields.body, bytes(side.buffer), end_of_stream)
        return [self._send(side, message)]

    def _buffer_partial(self, side: _Side, data: bytes, eos: bool) -> list[Action]:
        side.buffer += data
        if not eos and len(side.buffer) <= self.settings.buffer_limit:
            return []
        side.awaiting = Awaiting.PARTIAL
        message = codec.body_request(side.fields.body, bytes(side.buffer), eos)
        return [self._send(side, message)]

    def _overflow(self, side: _Side) -> list[Action]:
        """A BUFFERED body over the limit: core proxy behaviour, whatever failure_mode_allow.

        Envoy's 413 is its core's local reply, which ext_proc's response phase still sees;
        its 500 for a response comes after that phase and goes straight to the client.
        """
        if side.direction is Direction.RESPONSE:
            return self._finish(
                Ending.RESPONSE_TOO_LARGE,
                _local(500, b"Internal Server Error", "response_payload_too_large"),
            )
        side.discard = side.output_done = True
        side.awaiting = Awaiting.IDLE
        side.held = None
        side.buffer.clear()
        self.record.details = "request_payload_too_large"
        self.record.request_too_large = True
        return [RespondFromProxy(413, b"Payload Too Large", "request_payload_too_large")]

    def _on_trailers(self, side: _Side, trailers: Headers) -> list[Action]:
        side.input_done = True
        if side.discard:
            # Envoy forwards the original trailers after a replaced body, unmodified.
            return [] if side.output_done else self._forward_trailers(side, trailers)
        if self.complete:
            return self._forward_trailers(side, trailers)
        if self.observing:
            actions: list[Action] = []
            if side.trailer_mode == modes.SEND:
                message = codec.trailers_request(side.fields.trailers, self._visible(trailers))
                actions.append(self._send(side, message, timed=False))
            return [*actions, *self._forward_trailers(side, trailers)]
        side.trailers = trailers
        if side.body_mode == modes.FULL_DUPLEX_STREAMED:
            message = codec.trailers_request(side.fields.trailers, self._visible(trailers))
            return [self._send(side, message, timed=False)]
        if side.awaiting is Awaiting.HEADERS:
            side.early = side.early or self._early_body(side)
            return []
        buffering = side.body_mode in (modes.BUFFERED, modes.BUFFERED_PARTIAL)
        if buffering and not side.body_done:
            if side.awaiting is Awaiting.PARTIAL:
                return []
            if not side.buffer:
                return self._no_body_before_trailers(side)
            return self._send_buffered(side, end_of_stream=False)
        if side.chunks:
            return []
        return self._trailers_next(side)

    def _no_body_before_trailers(self, side: _Side) -> list[Action]:
        """Only trailers after the head: Envoy sends no body message, just the trailers."""
        side.body_done = True
        actions: list[Action] = []
        if side.held is not None:
            actions += self._release(side, side.held)
        return [*actions, *self._trailers_next(side)]

    def _trailers_next(self, side: _Side) -> list[Action]:
        """The body is done and answered: send the held trailers, or pass them on."""
        trailers = side.trailers
        if trailers is None:
            return []
        if side.trailer_mode == modes.SEND and not self.complete:
            side.awaiting = Awaiting.TRAILERS
            message = codec.trailers_request(side.fields.trailers, self._visible(trailers))
            return [self._send(side, message)]
        side.trailers = None
        return [*self._forward_trailers(side, trailers), *self._close_if_done()]

    def _send(
        self, side: _Side, request: ep.ProcessingRequest, timed: bool = True
    ) -> SendToProcessor:
        self._attach_context(side, request)
        if self.observing:
            request.observability_mode = True
            self.stream_open = True
            timed = False
        elif not self.stream_open:
            self.stream_open = True
            config = request.protocol_config
            config.request_body_mode = self._sides[Direction.REQUEST].body_mode
            config.response_body_mode = self._sides[Direction.RESPONSE].body_mode
            config.send_body_without_waiting_for_header_response = (
                self.settings.send_body_without_waiting_for_header_response
            )
        self.record.messages_sent += 1
        if timed:
            self._timer_running, self._timer_overridden = True, False
        return SendToProcessor(request, timed)

    def _attach_context(self, side: _Side, request: ep.ProcessingRequest) -> None:
        """metadata_context on every message; attributes on a direction's first one."""
        context = request.metadata_context
        context.SetInParent()
        metadata = self.record.dynamic_metadata
        if metadata:
            for namespace in self.settings.forwarding_namespaces:
                if namespace in metadata:
                    context.filter_metadata[namespace].CopyFrom(metadata[namespace])
        names = (
            self.settings.request_attributes
            if side.direction is Direction.REQUEST
            else self.settings.response_attributes
        )
        if names and not side.attributes_sent:
            side.attributes_sent = True
            request_head = self._sides[Direction.REQUEST].first_headers or Headers()
            response_head = self._sides[Direction.RESPONSE].first_headers
            values = attributes.evaluate(
                names,
                request_head,
                response_head,
                self._connection_info(),
                self._sides[Direction.REQUEST].bytes_received,
                # The proxy's reply in the upstream's place has its details by now.
                self.record.details or "via_upstream",
            )
            request.attributes[attributes.ATTRIBUTES_KEY].CopyFrom(values)

    def _connection_info(self) -> attributes.Connection:
        if self._connection is None:
            source = self._connection_source
            self._connection = attributes.Connection() if source is None else source()
        return self._connection

    def _receive_metadata(self, response: ep.ProcessingResponse) -> None:
        """Merge returned dynamic metadata, one level deep, for the listed namespaces."""
        for namespace, value in response.dynamic_metadata.fields.items():
            if namespace not in self.settings.receiving_namespaces:
                continue
            if self.record.dynamic_metadata is None:
                self.record.dynamic_metadata = {}
            target = self.record.dynamic_metadata.setdefault(namespace, struct_pb2.Struct())
            if value.HasField("struct_value"):
                for key, item in value.struct_value.fields.items():
                    target.fields[key].CopyFrom(item)

    def metadata_json(self, namespace: str) -> str | None:
        """A namespace as Envoy's %DYNAMIC_METADATA(ns)% prints it: compact, sorted JSON."""
        metadata = self.record.dynamic_metadata
        struct = None if metadata is None else metadata.get(namespace)
        if struct is None:
            return None
        data = json_format.MessageToDict(struct)
        return json.dumps(
            _whole_numbers(data), separators=(",", ":"), sort_keys=True, ensure_ascii=False
        )

    # Output -------------------------------------------------------------------------------

    def _release(self, side: _Side, headers: Headers, body: bytes | None = None) -> list[Action]:
        """Forward the head, and with ``body`` (a whole, final body) the body too.

        Without ``body``, whatever follows is the original body, so the original length
        holds unless the mode strips it.
        """
        if body is not None:
            known = not side.strip_length and b"content-length" in headers
            actions = self._release_head(side, headers, len(body) if known else None)
            return [*actions, self._body_action(side, body, side.trailers is None)]
        eos = side.input_done and side.trailers is None and not side.buffer and not side.chunks
        if not eos:
            length = None if side.strip_length else side.original_length
            return self._release_head(side, headers, length)
        side.held = None
        side.released = True
        side.output_done = True
        return [ForwardHeaders(side.direction, headers, True, None)]

    def _release_head(
        self, side: _Side, headers: Headers, length: int | None = None
    ) -> list[Action]:
        """Forward the head with a body to follow."""
        side.held = None
        side.released = True
        return [ForwardHeaders(side.direction, headers, False, length)]

    def _body_action(self, side: _Side, data: bytes, eos: bool) -> ForwardBody:
        if eos:
            side.output_done = True
        return ForwardBody(side.direction, data, eos)

    def _forward_body(self, side: _Side, data: bytes, eos: bool) -> list[Action]:
        if not data and not eos:
            return []
        return [self._body_action(side, data, eos), *(self._close_if_done() if eos else [])]

    def _forward_trailers(self, side: _Side, trailers: Headers) -> list[Action]:
        side.output_done = True
        return [ForwardTrailers(side.direction, trailers)]

    # Replies ------------------------------------------------------------------------------

    def _on_reply(self, response: ep.ProcessingResponse) -> list[Action]:
        if self.complete or self.observing:
            return []
        if response.HasField("override_message_timeout"):
            # The message is about the timer only; the processor still owes the real reply.
            return self._override_timeout(response.override_message_timeout.ToTimedelta())
        kind = response.WhichOneof("response")
        if kind is not None:
            # Applied before the reply is validated, as Envoy does.
            self._receive_metadata(response)
        if kind == "immediate_response" and not self.settings.disable_immediate_response:
            self.record.messages_received += 1
            return self._immediate(response.immediate_response)
        handler = _DISPATCH.get(kind or "")
        if handler is not None:
            direction, phase = handler
            side = self._sides[direction]
            if self._expects(side, phase, response):
                self.record.messages_received += 1
                self._timer_running = False
                if phase == "headers" and response.HasField("mode_override"):
                    self._override_mode(response.mode_override)
                return self._dispatch(side, phase, response)
        self.record.spurious += 1
        return self._fail(
            Ending.BAD_REPLY, self.settings.status_on_error, self._spurious_details(response)
        )

    def _spurious_details(self, response: ep.ProcessingResponse) -> str:
        """Envoy's text for a reply it did not expect: which one depends on the state the
        reply's direction is in (processor_state.cc)."""
        kind = response.WhichOneof("response")
        if kind == "immediate_response":
            return envoy_details("unhandled immediate response due to config disabled it")
        handler = _DISPATCH.get(kind or "")
        if handler is None:
            return envoy_details("unhandled message")
        direction, phase = handler
        side = self._sides[direction]
        if phase == "body" and _awaits_streamed_body(side):
            # Only a direction awaiting streamed body replies tells the two kinds apart.
            streamed = _common(response, direction, phase).body_mutation.HasField(
                "streamed_response"
            )
            if side.body_mode == modes.FULL_DUPLEX_STREAMED and not streamed:
                return envoy_details(SPURIOUS_NORMAL_BODY)
            if side.body_mode != modes.FULL_DUPLEX_STREAMED and streamed:
                return envoy_details(SPURIOUS_STREAMED_BODY)
        return envoy_details("spurious message")

    def _expects(self, side: _Side, phase: str, response: ep.ProcessingResponse) -> bool:
        if phase == "headers":
            return side.awaiting is Awaiting.HEADERS
        if phase == "trailers":
            return (
                side.awaiting is Awaiting.TRAILERS or side.body_mode == modes.FULL_DUPLEX_STREAMED
            )
        common = _common(response, side.direction, phase)
        streamed = common.body_mutation.HasField("streamed_response")
        if side.awaiting is Awaiting.HEADERS:
            return False  # the headers reply comes first, in every mode
        if side.body_mode == modes.FULL_DUPLEX_STREAMED:
            return bool(streamed)
        if side.awaiting in (Awaiting.BODY, Awaiting.PARTIAL):
            # Envoy's buffered callbacks do not look for streamed_response: such a mutation
            # carries no body, so it leaves the body as it is (and fails a content-length).
            return True
        return not streamed and bool(side.chunks)

    def _dispatch(self, side: _Side, phase: str, response: ep.ProcessingResponse) -> list[Action]:
        if phase == "trailers":
            return self._trailers_reply(side, _trailers_response(response, side.direction))
        common = _common(response, side.direction, phase)
        if phase == "headers":
            return self._headers_reply(side, common)
        if side.body_mode == modes.FULL_DUPLEX_STREAMED:
            return self._duplex_reply(side, common.body_mutation.streamed_response)
        if side.awaiting is Awaiting.BODY:
            return self._buffered_reply(side, common)
        if side.awaiting is Awaiting.PARTIAL:
            return self._partial_reply(side, common)
        return self._streamed_reply(side, common)

    def _mutate(self, headers: Headers, common: ep.CommonResponse, side: _Side) -> str | None:
        """Apply a CommonResponse's header mutation; the error text, if it failed."""
        if not common.HasField("header_mutation"):
            return None
        result = apply_header_mutation(
            headers,
            common.header_mutation,
            self.settings.rules,
            self.settings.limits,
            replacing=common.status == CONTINUE_AND_REPLACE,
            drop_content_length=side.strip_length,
            honor_append_action=self.settings.honor_append_action,
        )
        self.record.rejected_mutations += result.rejected
        return result.error

    def _headers_reply(self, side: _Side, common: ep.CommonResponse) -> list[Action]:
        headers = side.held
        assert headers is not None
        error = self._mutate(headers, common, side)
        if error:
            return self._mutation_failed(error)
        side.awaiting = Awaiting.IDLE
        if common.status == CONTINUE_AND_REPLACE:
            return self._replace(side, headers, common)
        if side.early:
            return self._early_reply(side, headers)
        return self._after_headers(side, headers)

    def _after_headers(self, side: _Side, headers: Headers) -> list[Action]:
        """The headers reply is applied: hold or release the head as the body mode says."""
        if side.body_mode in (modes.BUFFERED, modes.BUFFERED_PARTIAL) and not side.input_done:
            return []  # held until the body reply
        if side.body_mode == modes.FULL_DUPLEX_STREAMED and not side.headers_eos:
            return []  # released with the first body the processor streams back
        actions = self._release(side, headers)
        if side.body_mode == modes.STREAMED and side.chunks:
            side.awaiting = Awaiting.STREAMED
        elif side.trailers is not None:
            actions += self._trailers_next(side)
        return [*actions, *self._close_if_done()]

    def _early_reply(self, side: _Side, headers: Headers) -> list[Action]:
        """Body data (or the end) came while the headers reply was pending (STREAMED holds
        it, see takes_arrived_input). A whole body goes as one message and is handled as
        BUFFERED, whatever the mode a mode_override left: the head is held for the body
        reply, whose header mutation applies (Envoy's rule). Part of a body, or only
        trailers, is taken as if it came now: in STREAMED, what was held is one message."""
        side.early = False
        trailers = side.trailers
        if side.input_done and side.body_mode != modes.NONE and (side.buffer or trailers is None):
            side.awaiting = Awaiting.BODY
            message = codec.body_request(side.fields.body, bytes(side.buffer), trailers is None)
            return [self._send(side, message)]
        data = bytes(side.buffer)
        side.buffer.clear()
        eos = side.input_done and trailers is None
        side.input_done, side.trailers = False, None
        actions = self._after_headers(side, headers)
        if data or eos:
            side.input_done = eos
            actions += self._body(side, data, eos)
        if trailers is not None:
            actions += self._on_trailers(side, trailers)
        return actions

    def _replace(self, side: _Side, headers: Headers, common: ep.CommonResponse) -> list[Action]:
        """CONTINUE_AND_REPLACE: no more messages for this direction; maybe a new body."""
        side.body_mode = modes.NONE
        side.trailer_mode = modes.SKIP
        side.chunks.clear()
        side.outstanding = 0
        if not common.HasField("body_mutation"):
            if side.early:
                return self._early_reply(side, headers)  # what came early goes on as it is
            return [*self._release(side, headers), *self._close_if_done()]
        headers.remove(b"content-length")
        side.discard = True
        side.early = False
        side.buffer.clear()
        side.strip_length = True
        body = _mutated(common.body_mutation, b"")
        actions = self._release_head(side, headers)
        if not side.input_done:
            # The original body is read and dropped; its end (or trailers) ends this one.
            actions.append(ForwardBody(side.direction, body, False))
        else:
            actions.append(self._body_action(side, body, side.trailers is None))
            if side.trailers is not None:
                trailers, side.trailers = side.trailers, None
                actions += self._forward_trailers(side, trailers)
        return [*actions, *self._close_if_done()]

    def _buffered_reply(self, side: _Side, common: ep.CommonResponse) -> list[Action]:
        side.awaiting = Awaiting.IDLE
        headers = side.held
        if headers is not None:
            error = self._mutate(headers, common, side)
            if error:
                return self._mutation_failed(error)
        if headers is not None and common.HasField("body_mutation"):
            # Envoy compares with the body the mutation carries (none: 0 bytes), not with the
            # body that results: a mutation that only clears, or keeps, must match too.
            length = headers.get(b"content-length")
            carried = len(common.body_mutation.body)
            if length is not None and length.isdigit() and int(length) != carried:
                return self._mutation_failed(ERR_LENGTH_MISMATCH)
        body = _mutated(common.body_mutation, bytes(side.buffer))
        side.buffer.clear()
        side.body_done = True  # the rest, if any (trailers), passes through
        if headers is not None:
            actions = self._release(side, headers, body)
        else:
            actions = [self._body_action(side, body, side.trailers is None)]
        return [*actions, *self._trailers_next(side), *self._close_if_done()]

    def _partial_reply(self, side: _Side, common: ep.CommonResponse) -> list[Action]:
        side.awaiting = Awaiting.IDLE
        headers = side.held
        if headers is not None:
            error = self._mutate(headers, common, side)
            if error:
                return self._mutation_failed(error)
        body = _mutated(common.body_mutation, bytes(side.buffer))
        side.buffer.clear()
        side.body_done = True
        eos = side.input_done and side.trailers is None
        actions: list[Action] = []
        if headers is not None:
            actions += self._release_head(side, headers)
        actions.append(self._body_action(side, body, eos))
        return [*actions, *self._trailers_next(side), *self._close_if_done()]

    def _streamed_reply(self, side: _Side, common: ep.CommonResponse) -> list[Action]:
        # header_mutation in a streamed body reply is ignored: the head has gone.
        data, eos = side.chunks.popleft()
        side.outstanding -= len(data)
        if not side.chunks:
            side.awaiting = Awaiting.IDLE
        actions: list[Action] = [self._body_action(side, _mutated(common.body_mutation, data), eos)]
        if not side.chunks and side.trailers is not None and side.input_done:
            actions += self._trailers_next(side)
        return [*actions, *self._close_if_done()]

    def _duplex_reply(self, side: _Side, streamed: ep.StreamedBodyResponse) -> list[Action]:
        actions: list[Action] = []
        if side.held is not None:
            actions += self._release_head(side, side.held)
        eos = streamed.end_of_stream
        if streamed.body or eos:
            actions.append(self._body_action(side, streamed.body, eos))
        return [*actions, *(self._close_if_done() if eos else [])]

    def _trailers_reply(self, side: _Side, response: ep.TrailersResponse) -> list[Action]:
        if side.body_mode == modes.FULL_DUPLEX_STREAMED:
            return self._duplex_trailers(side, response)
        trailers = side.trailers
        assert trailers is not None
        side.awaiting = Awaiting.IDLE
        side.trailers = None
        if response.HasField("header_mutation"):
            error = self._mutate(
                trailers, ep.CommonResponse(header_mutation=response.header_mutation), side
            )
            if error:
                return self._mutation_failed(error)
        return [*self._forward_trailers(side, trailers), *self._close_if_done()]

    def _duplex_trailers(self, side: _Side, response: ep.TrailersResponse) -> list[Action]:
        # The reply mutates the trailers the message had; Envoy cannot synthesise trailers
        # for a message without them, so then the reply is ignored.
        trailers = side.trailers
        if trailers is None or side.output_done:
            return []
        side.trailers = None
        if response.HasField("header_mutation"):
            error = self._mutate(
                trailers, ep.CommonResponse(header_mutation=response.header_mutation), side
            )
            if error:
                return self._mutation_failed(error)
        actions: list[Action] = []
        if side.held is not None:
            actions += self._release_head(side, side.held)
        return [*actions, *self._forward_trailers(side, trailers), *self._close_if_done()]

    def _override_timeout(self, value: Any) -> list[Action]:
        """Envoy accepts one override per outstanding message, within 1 ms and
        max_message_timeout, while that message's timer runs (docs/protocol.md, Control)."""
        seconds = value.total_seconds()
        in_range = 0.001 <= seconds <= self.settings.max_message_timeout
        if self._timer_running and not self._timer_overridden and in_range:
            self._timer_overridden = True
            self.record.override_timeout_received += 1
            return [RestartTimer(seconds)]
        self.record.override_timeout_ignored += 1
        if not in_range:
            # Envoy warns of this case only (the others are a processor's race with its timer).
            self.record.override_timeout_out_of_range += 1
        return []

    def _override_mode(self, override: ep.ProcessingMode) -> None:
        settings = self.settings
        if (
            not settings.allow_mode_override
            or settings.send_body_without_waiting_for_header_response
        ):
            return
        base = settings.processing_mode
        if modes.FULL_DUPLEX_STREAMED in (base.request_body_mode, base.response_body_mode):
            return
        merged = modes.merge_override(base, override)
        if not modes.override_allowed(merged, settings.allowed_override_modes):
            return
        self.mode = merged
        for side, body, trailer in (
            (self._sides[Direction.REQUEST], merged.request_body_mode, merged.request_trailer_mode),
            (
                self._sides[Direction.RESPONSE],
                merged.response_body_mode,
                merged.response_trailer_mode,
            ),
        ):
            # A body that came whole while the headers reply was pending is still to send.
            if not side.input_done or side.early or not side.started:
                side.body_mode, side.trailer_mode = body, trailer
                side.strip_length = side.started and modes.strips_content_length(
                    body, self._header_mode(side)
                )
                if side.strip_length and side.held is not None:
                    side.held.remove(b"content-length")

    def _immediate(self, immediate: ep.ImmediateResponse) -> list[Action]:
        # Below 200 is Envoy's rule; from 1000 on there is no HTTP/1.1 status line to write.
        status = immediate.status.code if 200 <= immediate.status.code < 1000 else 200
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
            self.record.rejected_mutations += result.rejected
        status = int(headers.get(b":status") or status)
        body = immediate.body
        if body:
            headers.set(b"content-length", str(len(body)).encode())
            if b"content-type" not in headers:
                headers.set(b"content-type", b"text/plain")
        else:
            headers.remove(b"content-length")
            headers.remove(b"content-type")
        details = envoy_details(immediate.details)
        return self._finish(
            Ending.IMMEDIATE_RESPONSE, RespondLocally(status, headers, body, details)
        )

    def _on_closed(self, event: ProcessorClosed) -> list[Action]:
        if event.code != 0:
            self.record.stream_error = event.code
        if self.complete:
            return []
        if event.code == 0:
            self.record.ending = Ending.PROCESSOR_CLOSED
            return self._release_all()
        return self._fail(
            Ending.STREAM_ERROR,
            self.settings.status_on_error,
            _grpc_error_details(event.code, event.details),
        )

    def _on_http_failed(self, event: ProcessorHttpFailed) -> list[Action]:
        if self.complete:
            return []
        self.record.http_failure = event.reason
        return self._fail(Ending.HTTP_ERROR, self.settings.status_on_error, _HTTP_ERROR)

    def _on_timeout(self) -> list[Action]:
        if self.complete:
            return []
        return self._fail(
            Ending.MESSAGE_TIMEOUT, 504, "ext_proc_error_per-message_timeout_exceeded"
        )

    # Endings ------------------------------------------------------------------------------

    def _fail(self, ending: Ending, status: int, details: str) -> list[Action]:
        duplex_started = any(s.duplex_data_sent for s in self._sides.values())
        self.record.fault = details
        if self.settings.failure_mode_allow and not duplex_started:
            # The response is the upstream's: its details are not the error's (Envoy's too).
            self.record.ending, self.record.failed_open = ending, True
            return self._release_all()
        return self._finish(ending, _local(status, b"", details))

    def _mutation_failed(self, error: str) -> list[Action]:
        # Mutation errors never fail open (Envoy: failure_mode_allow does not apply).
        self.record.fault = error
        return self._finish(
            Ending.MUTATION_ERROR, _local(self.settings.status_on_error, b"", error)
        )

    def _finish(self, ending: Ending, reply: RespondLocally) -> list[Action]:
        self.record.ending, self.record.details = ending, reply.details
        for side in self._sides.values():
            side.awaiting = Awaiting.IDLE
            side.held = None
            side.chunks.clear()
        self.complete = True
        return [CloseStream(), reply]

    def _release_all(self) -> list[Action]:
        """The processor is out of the picture: everything held goes on unmodified."""
        self.complete = True
        actions: list[Action] = [CloseStream()]
        for side in self._sides.values():
            side.awaiting = Awaiting.IDLE
            if side.held is not None:
                actions += self._release(side, side.held)
            if side.buffer:
                data = bytes(side.buffer)
                side.buffer.clear()
                actions += self._forward_body(side, data, side.input_done and not side.trailers)
            while side.chunks:
                data, eos = side.chunks.popleft()
                actions += self._forward_body(side, data, eos)
            side.outstanding = 0
            if side.trailers is not None and side.released:
                trailers, side.trailers = side.trailers, None
                actions += self._forward_trailers(side, trailers)
        return actions

    def _close_if_done(self) -> list[Action]:
        """Close the stream as soon as no message can follow (Envoy's close optimisation).

        Not in observability mode, where the stream outlives the exchange
        (deferred_close_timeout) so queued messages still get through.
        """
        if self.complete or not self.stream_open or self.observing or self._more_to_send():
            return []
        self.complete = True
        return [CloseStream()]

    def _more_to_send(self) -> bool:
        if self.awaiting_reply:
            return True
        request, response = self._sides[Direction.REQUEST], self._sides[Direction.RESPONSE]
        if not request.output_done and _sends_after_headers(request):
            return True
        if not response.started:
            return self.mode.response_header_mode != modes.SKIP or _sends_after_headers(response)
        return not response.output_done and _sends_after_headers(response)


def _grpc_error_details(code: int, message: str) -> str:
    """As Envoy's access log has it: ext_proc_error_gRPC_error_13{boom{via_upstream}}."""
    message = envoy_details(message)
    inner = f"{message}{{via_upstream}}" if message else "via_upstream"
    return f"ext_proc_error_gRPC_error_{code}{{{inner}}}"


def _whole_numbers(value: Any) -> Any:
    """JSON numbers as Envoy prints them: 1, not 1.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def _awaits_streamed_body(side: _Side) -> bool:
    """Envoy's StreamedBodyCallback state: STREAMED chunks, or FULL_DUPLEX_STREAMED body data,
    sent and not yet answered in full."""
    if side.body_mode == modes.FULL_DUPLEX_STREAMED:
        return side.duplex_data_sent and not side.output_done
    return side.awaiting is Awaiting.STREAMED


def _duplex_pending(side: _Side) -> bool:
    """FULL_DUPLEX_STREAMED: the processor still owes the rest of the body it streams."""
    return (
        side.body_mode == modes.FULL_DUPLEX_STREAMED
        and side.started
        and not side.output_done
        and not side.discard
    )


def _sends_after_headers(side: _Side) -> bool:
    if side.discard:
        return False
    body = side.body_mode != modes.NONE and not side.body_done
    return body or (side.trailer_mode == modes.SEND and not side.output_done)


_DISPATCH: dict[str, tuple[Direction, str]] = {
    "request_headers": (Direction.REQUEST, "headers"),
    "response_headers": (Direction.RESPONSE, "headers"),
    "request_body": (Direction.REQUEST, "body"),
    "response_body": (Direction.RESPONSE, "body"),
    "request_trailers": (Direction.REQUEST, "trailers"),
    "response_trailers": (Direction.RESPONSE, "trailers"),
}


def _common(response: ep.ProcessingResponse, direction: Direction, phase: str) -> ep.CommonResponse:
    return getattr(response, f"{direction.value}_{phase}").response


def _trailers_response(
    response: ep.ProcessingResponse, direction: Direction
) -> ep.TrailersResponse:
    return getattr(response, f"{direction.value}_trailers")


def _mutated(mutation: ep.BodyMutation, data: bytes) -> bytes:
    kind = mutation.WhichOneof("mutation")
    if kind == "body":
        return bytes(mutation.body)
    if kind == "clear_body" and mutation.clear_body:
        return b""
    return data


def _local(status: int, body: bytes, details: str) -> RespondLocally:
    headers = Headers([(b":status", str(status).encode())])
    if body:
        headers.add(b"content-length", str(len(body)).encode())
        headers.add(b"content-type", b"text/plain")
    return RespondLocally(status, headers, body, details)
