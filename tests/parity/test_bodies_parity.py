"""Body and trailer parity: the same scenario through real Envoy 1.40 and through extproc.

Every scenario runs, per side, a fresh upstream and a ScriptedProcessor running the same
handler; the same client request goes through Envoy and through extproc. What the client, the
upstream and the processor saw must be equal once normalised (tests/support/parity.py; the
scenario's own normalisation is described where it is declared).

Request-direction scenarios use EchoUpstream (its JSON echo shows the client what the upstream
got). Response-direction scenarios use :class:`ReplyingUpstream`, which answers with a scripted
body, optionally paced like the client's request body (see ``Scenario.pace``).

Print one scenario's observation (Envoy's by default) to read what Envoy does::

    python -m tests.parity.test_bodies_parity                 # list the scenario ids
    python -m tests.parity.test_bodies_parity ID [ID ...]     # Envoy's observation
    python -m tests.parity.test_bodies_parity --extproc ID    # extproc's

With BODIES_PARITY_ENVOY_LOG=debug (or trace, ...) Envoy runs at that log level and its log is
printed after the observation; BODIES_PARITY_CLIENT_TIMEOUT (seconds, default 20) bounds the
client's wait for the reply.
"""

from __future__ import annotations

import contextlib
import os
import pprint
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import h11
import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core.settings import DEFAULT_BUFFER_LIMIT
from extproc.demo.upstream import EchoUpstream, ReceivedRequest, pattern
from tests.support import parity
from tests.support.envoy import EnvoyProxy, require_envoy
from tests.support.processor import (
    Handler,
    ProcessorStream,
    ReplyFor,
    ScriptedProcessor,
    immediate,
    matching_reply,
    mutate_headers,
)
from tests.support.proxy import Reply, running_proxy

pytestmark = pytest.mark.parity

RECV_TIMEOUT_S = 30.0
STREAMS_DONE_S = 30.0
CLIENT_TIMEOUT_S = float(os.environ.get("BODIES_PARITY_CLIENT_TIMEOUT", "20"))
UPSTREAM_TIMEOUT_S = 30.0
# Pacing is best effort: past this, the next chunk goes anyway (only the split changes).
PACE_WAIT_S = 5.0
# Pacer.wait_ended's bound: Envoy ends the stream within milliseconds of the reply.
ENDED_WAIT_S = 1.0
# "Settled": the body is held back until the processor has seen the headers and then this
# long, so that the proxy has applied the headers reply before any body arrives. Body data
# that arrives while the headers reply is pending is queued whole, whatever the limit (Envoy
# then sends it as one message), which is not what the over-the-limit scenarios are about.
# BUFFERED_PARTIAL also needs the pause after its one message: when a body over the limit
# arrives whole, end included, in one read after the headers reply, Envoy 1.40 sends it all
# (end_of_stream false) and then never finishes the message: client and upstream hang.
SETTLE_S = 0.5
# Envoy's 200 ms default message_timeout is too short for a loaded machine; nothing here tests
# the timeout.
GENEROUS: dict[str, Any] = {"message_timeout": "20s"}
# The small buffer limit for the over-the-limit scenarios (Envoy: the listener's
# per_connection_buffer_limit_bytes; extproc: buffer_limit_bytes).
SMALL_LIMIT = 1024
BIG = pattern(4 * SMALL_LIMIT)

ACCESS_LOG_FORMAT = (
    "code=%RESPONSE_CODE% details=%RESPONSE_CODE_DETAILS% flags=%RESPONSE_FLAGS% "
    "termination=%CONNECTION_TERMINATION_DETAILS% upstream=%UPSTREAM_HOST% "
    "rx=%BYTES_RECEIVED% tx=%BYTES_SENT%\n"
)

BODY_KINDS = ("request_body", "response_body")
TRAILER_KINDS = ("request_trailers", "response_trailers")


# Replies -----------------------------------------------------------------------------------


def kind_of(message: ep.ProcessingRequest) -> str:
    return str(message.WhichOneof("request"))


def body_of(message: ep.ProcessingRequest) -> bytes:
    return bytes(getattr(message, kind_of(message)).body)


def eos_of(message: ep.ProcessingRequest) -> bool:
    return bool(getattr(message, kind_of(message)).end_of_stream)


def common(
    *,
    body: bytes | None = None,
    clear: bool = False,
    set_headers: Sequence[tuple[str, str]] = (),
    replace: bool = False,
) -> ep.CommonResponse:
    response = ep.CommonResponse()
    if replace:
        response.status = ep.CommonResponse.CONTINUE_AND_REPLACE
    if set_headers:
        response.header_mutation.CopyFrom(mutate_headers(set_headers=set_headers).header_mutation)
    if body is not None:
        response.body_mutation.body = body
    elif clear:
        response.body_mutation.clear_body = True
    return response


def body_reply(message: ep.ProcessingRequest, **fields: Any) -> ep.ProcessingResponse:
    """The BodyResponse to a body message, its CommonResponse built by common(**fields)."""
    return ep.ProcessingResponse(**{kind_of(message): ep.BodyResponse(response=common(**fields))})


def streamed(kind: str, body: bytes, end_of_stream: bool) -> ep.ProcessingResponse:
    """A FULL_DUPLEX_STREAMED body chunk for direction ``kind`` (request_/response_body)."""
    mutation = ep.BodyMutation(
        streamed_response=ep.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
    )
    response = ep.CommonResponse(body_mutation=mutation)
    return ep.ProcessingResponse(**{kind: ep.BodyResponse(response=response)})


def trailers_reply(
    message: ep.ProcessingRequest,
    set_headers: Sequence[tuple[str, str]] = (),
    remove: Sequence[str] = (),
) -> ep.ProcessingResponse:
    mutation = mutate_headers(set_headers=set_headers, remove=remove).header_mutation
    return ep.ProcessingResponse(
        **{kind_of(message): ep.TrailersResponse(header_mutation=mutation)}
    )


# Handlers ----------------------------------------------------------------------------------


def answering(**replies: ReplyFor) -> Handler:
    """Answer each message kind named in ``replies`` with its function, others with CONTINUE."""

    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv(RECV_TIMEOUT_S)) is not None:
            reply = replies.get(kind_of(message), matching_reply)
            stream.send(reply(message))

    return handler


def continue_all(stream: ProcessorStream) -> None:
    answering()(stream)


def uppercase(message: ep.ProcessingRequest) -> ep.ProcessingResponse:
    return body_reply(message, body=body_of(message).upper())


def clear_then_replace_last(message: ep.ProcessingRequest) -> ep.ProcessingResponse:
    """Clear every chunk; the one that ends the body becomes b"replaced at the end"."""
    if eos_of(message):
        return body_reply(message, body=b"replaced at the end")
    return body_reply(message, clear=True)


def mutate_trailers(message: ep.ProcessingRequest) -> ep.ProcessingResponse:
    return trailers_reply(
        message, set_headers=[("x-trailer-set", "by-processor")], remove=["x-trailer-drop"]
    )


def replace_body(new: bytes, *, fix_length: bool) -> ReplyFor:
    """Replace the whole (BUFFERED) body, setting content-length to match when asked."""
    headers = [("content-length", str(len(new)))] if fix_length else []
    return lambda message: body_reply(message, body=new, set_headers=headers)


def keep_body_with_empty_mutation(message: ep.ProcessingRequest) -> ep.ProcessingResponse:
    """A body_mutation that is there but changes nothing: clear_body false."""
    reply = body_reply(message)
    getattr(reply, kind_of(message)).response.body_mutation.clear_body = False
    return reply


def unsolicited_after_request_headers(extra: ReplyFor) -> Handler:
    """Answer the request headers, then SETTLE_S later (the proxy has sent the request on and
    waits for the upstream) send ``extra(message)`` unasked; answer the rest with CONTINUE."""

    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv(RECV_TIMEOUT_S)) is not None:
            stream.send(matching_reply(message))
            if kind_of(message) == "request_headers":
                time.sleep(SETTLE_S)
                stream.send(extra(message))

    return handler


def early_response_headers_reply(message: ep.ProcessingRequest) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(response_headers=ep.HeadersResponse())


def header_from_body_reply(message: ep.ProcessingRequest) -> ep.ProcessingResponse:
    return body_reply(message, set_headers=[("x-set-in-body-reply", kind_of(message))])


def full_duplex(transform: Callable[[bytes], bytes], *, per_chunk: bool) -> Handler:
    """FULL_DUPLEX_STREAMED: answer headers with CONTINUE, then stream the body back.

    per_chunk: each body message is answered with transform(chunk) at once. Otherwise the body
    is collected and sent back as one transform(whole body) when it ends: with end_of_stream
    on the body's last message, or (end_of_stream false) right before the trailers response,
    which mutates the trailers.
    """

    def handler(stream: ProcessorStream) -> None:
        held = {kind: bytearray() for kind in BODY_KINDS}
        while (message := stream.recv(RECV_TIMEOUT_S)) is not None:
            kind = kind_of(message)
            if kind in BODY_KINDS:
                if per_chunk:
                    stream.send(streamed(kind, transform(body_of(message)), eos_of(message)))
                    continue
                held[kind] += body_of(message)
                if eos_of(message):
                    stream.send(streamed(kind, transform(bytes(held[kind])), True))
            elif kind in TRAILER_KINDS:
                body_kind = kind.replace("_trailers", "_body")
                if not per_chunk:
                    stream.send(streamed(body_kind, transform(bytes(held[body_kind])), False))
                stream.send(mutate_trailers(message))
            else:
                stream.send(matching_reply(message))

    return handler


def immediate_on_response_chunk(number: int) -> Handler:
    """STREAMED response: CONTINUE response chunks before the ``number``-th (1-based), answer
    that one with an ImmediateResponse."""

    def handler(stream: ProcessorStream) -> None:
        seen = 0
        while (message := stream.recv(RECV_TIMEOUT_S)) is not None:
            if kind_of(message) == "response_body":
                seen += 1
                if seen == number:
                    stream.send(immediate(503, b"stopped mid-body", details="mid body"))
                    continue
            stream.send(matching_reply(message))

    return handler


def override_response_body_mode(mode: int) -> ReplyFor:
    def reply(message: ep.ProcessingRequest) -> ep.ProcessingResponse:
        response = matching_reply(message)
        response.mode_override.CopyFrom(ProcessingMode(response_body_mode=mode))
        return response

    return reply


# Scenarios ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamReply:
    """What ReplyingUpstream answers: the body in ``chunks`` (one socket write each, paced),
    chunked (with ``trailers``) or with a content-length."""

    chunks: tuple[bytes, ...] = (b"response ", b"body ", b"in chunks")
    chunked: bool = True
    trailers: tuple[tuple[str, str], ...] = ()
    status: int = 200
    # As Scenario.pace and Scenario.settle, for the response body.
    pace: tuple[int, ...] = ()
    settle: bool = False
    # Chunk indexes sent only once the processor's stream has ended (the proxy's doing after
    # an immediate response): otherwise the proxy may read them before it takes that reply.
    after_end: tuple[int, ...] = ()
    # Answer only once the processor has seen the request headers, and twice SETTLE_S more:
    # what it sends SETTLE_S after its reply (see unsolicited_after_request_headers) has then
    # reached the proxy, which by then has sent the request on.
    settle_head: bool = False


@dataclass(frozen=True)
class Scenario:
    id: str
    handler: Handler = continue_all
    ext_proc: dict[str, Any] = field(default_factory=lambda: dict(GENEROUS))
    method: str = "POST"
    target: str = "/"
    headers: tuple[tuple[str, str], ...] = (("x-custom", "a"),)
    # bytes: sent with a content-length; a tuple: chunked, one chunk per write.
    body: bytes | tuple[bytes, ...] | None = None
    trailers: tuple[tuple[str, str], ...] = ()
    # Chunk indexes: chunk pace[j] is sent only once the processor has seen j + 1 body
    # messages of the direction, so that the proxy most likely reads it on its own (STREAMED
    # and FULL_DUPLEX_STREAMED; BUFFERED_PARTIAL after its one message). Best effort.
    pace: tuple[int, ...] = ()
    # Send the body only once settled (see SETTLE_S), and settle again at each pace point.
    settle: bool = False
    # None: EchoUpstream; else ReplyingUpstream answering this.
    reply: UpstreamReply | None = None
    buffer_limit: int | None = None
    # STREAMED / FULL_DUPLEX_STREAMED: how the body is split into messages depends on how
    # the proxy's socket reads fall, so consecutive body messages are compared concatenated
    # (plus the flags that do not depend on the split), not message by message.
    coalesce: bool = False
    # BUFFERED_PARTIAL over the limit: the one body message holds "the limit, plus the rest
    # of the read that crossed it", so its length depends on reads too (see partial_view).
    partial_limit: int | None = None
    streams: int = 1
    # After a complete reply, a small GET on the same connection: the observation then says
    # whether the proxy kept the connection (and answered it) or ended it.
    next_request: bool = False
    # Chunks from this index on (0 for a content-length body) are sent only once the reply
    # is read: the proxy answers before the request's end.
    hold_from: int | None = None


def _ext(**fields: Any) -> dict[str, Any]:
    return {**GENEROUS, **fields}


def _modes(**modes: str) -> dict[str, Any]:
    return _ext(processing_mode=modes)


TRAILERS = (("x-trailer-keep", "k"), ("x-trailer-drop", "d"))
CHUNKS = (b"first chunk, ", b"second chunk, ", b"third chunk")
CL_BODY = b"a body with a content-length"
NEW_BODY = b"a new, longer body set by the processor"
GET = {"method": "GET"}
REDIRECT = immediate(302, headers=[("location", "/elsewhere")], details="moved")


def _request(id: str, **fields: Any) -> Scenario:
    return Scenario(id, **fields)


def _redirected(id: str, **fields: Any) -> Scenario:
    """A request the processor redirects at its headers, then a GET on the connection."""
    return Scenario(
        id, handler=answering(request_headers=lambda m: REDIRECT), next_request=True, **fields
    )


def _rejected(id: str, kind: str, **fields: Any) -> Scenario:
    """A request the processor answers 400 at its message ``kind``, then a GET on the
    connection."""
    bad = immediate(400, b"bad", details="bad")
    return Scenario(id, handler=answering(**{kind: lambda m: bad}), next_request=True, **fields)


def _response(id: str, reply: UpstreamReply | None = None, **fields: Any) -> Scenario:
    """A response-direction scenario: GET without a body, ReplyingUpstream answering."""
    return Scenario(id, reply=reply or UpstreamReply(), **{**GET, **fields})


CL_REPLY = UpstreamReply(chunks=(b"a response body with a content-length",), chunked=False)
BIG_CHUNKS = tuple(BIG[i : i + 512] for i in range(0, len(BIG), 512))
BIG_CL_REPLY = UpstreamReply(chunks=(BIG,), chunked=False, settle=True)
BIG_CHUNKED_REPLY = UpstreamReply(chunks=BIG_CHUNKS, settle=True)
TRAILER_REPLY = UpstreamReply(trailers=TRAILERS)
PACED_REPLY = UpstreamReply(pace=(1, 2))
PACED_TRAILER_REPLY = UpstreamReply(trailers=TRAILERS, pace=(1, 2))
# Over the limit after three chunks; the other five only once the processor has answered.
PARTIAL_REPLY = UpstreamReply(chunks=BIG_CHUNKS, pace=(3,), settle=True)

# Both header modes SKIP and nothing else sent: extproc runs no exchange at all for these
# (request_loop.PassThrough); what comes out must still be what Envoy forwards.
_NOTHING_SENT = {"request_header_mode": "SKIP", "response_header_mode": "SKIP"}

SCENARIOS = [
    # -- Nothing sent to the processor ----------------------------------------------------
    _request(
        "nothing-sent-request-chunked-trailers",
        ext_proc=_modes(**_NOTHING_SENT),
        body=CHUNKS,
        trailers=TRAILERS,
        streams=0,
    ),
    _request(
        "nothing-sent-request-content-length",
        ext_proc=_modes(**_NOTHING_SENT),
        body=CL_BODY,
        streams=0,
    ),
    _response(
        "nothing-sent-response-chunked-trailers",
        TRAILER_REPLY,  # unpaced: no body message ever reaches the processor to pace by
        ext_proc=_modes(**_NOTHING_SENT),
        streams=0,
    ),
    _response(
        "nothing-sent-response-content-length",
        CL_REPLY,
        ext_proc=_modes(**_NOTHING_SENT),
        streams=0,
    ),
    # -- NONE with trailers sent ----------------------------------------------------------
    _request(
        "none-request-trailers",
        ext_proc=_modes(request_trailer_mode="SEND"),
        handler=answering(request_trailers=mutate_trailers),
        body=CHUNKS,
        trailers=TRAILERS,
    ),
    _response(
        "none-response-trailers",
        TRAILER_REPLY,
        ext_proc=_modes(response_trailer_mode="SEND"),
        handler=answering(response_trailers=mutate_trailers),
    ),
    # -- An empty body framed by content-length: 0, in each body mode ----------------------
    # Envoy's codec writes content-length: 0 for a request that ends with its head whatever
    # ext_proc removed (some origins answer 411 without it).
    *(
        _request(
            f"{mode.lower().replace('_', '-')}-request-content-length-zero",
            ext_proc=_modes(request_body_mode=mode, request_trailer_mode=trailer_mode),
            body=b"",
        )
        for mode, trailer_mode in (
            ("BUFFERED", "DEFAULT"),
            ("STREAMED", "DEFAULT"),
            ("BUFFERED_PARTIAL", "DEFAULT"),
            ("FULL_DUPLEX_STREAMED", "SEND"),
        )
    ),
    _request(
        "buffered-header-skip-request-content-length-zero",
        ext_proc=_modes(request_header_mode="SKIP", request_body_mode="BUFFERED"),
        body=b"",
    ),
    _request(
        "streamed-request-no-length",
        ext_proc=_modes(request_body_mode="STREAMED"),
    ),
    # -- A message the processor sends unasked while the proxy waits for the upstream -------
    # Envoy takes it as it comes: spurious, status_on_error once the upstream answers, and
    # the response headers never go to the processor.
    _response(
        "unsolicited-request-headers-reply-while-upstream-waits",
        UpstreamReply(settle_head=True),
        handler=unsolicited_after_request_headers(matching_reply),
    ),
    _response(
        "unsolicited-response-headers-reply-while-upstream-waits",
        UpstreamReply(settle_head=True),
        handler=unsolicited_after_request_headers(early_response_headers_reply),
    ),
    # -- BUFFERED -------------------------------------------------------------------------
    _request(
        "buffered-request-content-length",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        body=CL_BODY,
    ),
    _response(
        "buffered-response-content-length", CL_REPLY, ext_proc=_modes(response_body_mode="BUFFERED")
    ),
    _request(
        "buffered-request-chunked", ext_proc=_modes(request_body_mode="BUFFERED"), body=CHUNKS
    ),
    _response("buffered-response-chunked", ext_proc=_modes(response_body_mode="BUFFERED")),
    _request(
        "buffered-request-chunked-trailers",
        ext_proc=_modes(request_body_mode="BUFFERED", request_trailer_mode="SEND"),
        handler=answering(request_trailers=mutate_trailers),
        body=CHUNKS,
        trailers=TRAILERS,
    ),
    _response(
        "buffered-response-chunked-trailers",
        TRAILER_REPLY,
        ext_proc=_modes(response_body_mode="BUFFERED", response_trailer_mode="SEND"),
        handler=answering(response_trailers=mutate_trailers),
    ),
    # Trailers present but not sent (trailer mode default): they pass through.
    _request(
        "buffered-request-trailers-not-sent",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        body=CHUNKS,
        trailers=TRAILERS,
    ),
    _request(
        "buffered-request-replace-fix-length",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        handler=answering(request_body=replace_body(NEW_BODY, fix_length=True)),
        body=CL_BODY,
    ),
    _response(
        "buffered-response-replace-fix-length",
        CL_REPLY,
        ext_proc=_modes(response_body_mode="BUFFERED"),
        handler=answering(response_body=replace_body(NEW_BODY, fix_length=True)),
    ),
    _request(
        "buffered-request-replace-chunked",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        handler=answering(request_body=replace_body(NEW_BODY, fix_length=False)),
        body=CHUNKS,
    ),
    _request(
        "buffered-request-replace-length-mismatch",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        handler=answering(request_body=replace_body(NEW_BODY, fix_length=False)),
        body=CL_BODY,
    ),
    _response(
        "buffered-response-replace-length-mismatch",
        CL_REPLY,
        ext_proc=_modes(response_body_mode="BUFFERED"),
        handler=answering(response_body=replace_body(NEW_BODY, fix_length=False)),
    ),
    _request(
        "buffered-request-clear-length-mismatch",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        handler=answering(request_body=lambda m: body_reply(m, clear=True)),
        body=CL_BODY,
    ),
    # A body mutation that carries no body (clear_body false alone): Envoy checks the
    # content-length against the length the mutation carries, 0, not the body that results.
    _request(
        "buffered-request-empty-mutation-length-mismatch",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        handler=answering(request_body=keep_body_with_empty_mutation),
        body=CL_BODY,
    ),
    _response(
        "buffered-response-empty-mutation-length-mismatch",
        CL_REPLY,
        ext_proc=_modes(response_body_mode="BUFFERED"),
        handler=answering(response_body=keep_body_with_empty_mutation),
    ),
    _request(
        "buffered-request-empty-mutation-chunked",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        handler=answering(request_body=keep_body_with_empty_mutation),
        body=CHUNKS,
    ),
    # The body arrives with the headers (while their reply is pending) here, and after the
    # headers reply in the chunked one: over the limit is 413 either way, and the connection
    # is kept (the rest of the body is read).
    _request(
        "buffered-request-over-limit",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        body=BIG,
        buffer_limit=SMALL_LIMIT,
        next_request=True,
    ),
    _request(
        "buffered-request-chunked-over-limit",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        body=BIG_CHUNKS,
        settle=True,
        buffer_limit=SMALL_LIMIT,
        next_request=True,
    ),
    # The 413 is a local reply that goes through the filter's response path: with a BUFFERED
    # response body the processor sees its body too.
    _request(
        "buffered-both-request-over-limit",
        ext_proc=_modes(request_body_mode="BUFFERED", response_body_mode="BUFFERED"),
        handler=answering(response_body=header_from_body_reply),
        body=BIG,
        buffer_limit=SMALL_LIMIT,
    ),
    _response(
        "buffered-response-over-limit",
        BIG_CL_REPLY,
        ext_proc=_modes(response_body_mode="BUFFERED"),
        buffer_limit=SMALL_LIMIT,
    ),
    _response(
        "buffered-response-chunked-over-limit",
        BIG_CHUNKED_REPLY,
        ext_proc=_modes(response_body_mode="BUFFERED"),
        buffer_limit=SMALL_LIMIT,
    ),
    _request(
        "buffered-request-header-mutation-in-body-reply",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        handler=answering(request_body=header_from_body_reply),
        body=CL_BODY,
    ),
    _response(
        "buffered-response-header-mutation-in-body-reply",
        CL_REPLY,
        ext_proc=_modes(response_body_mode="BUFFERED"),
        handler=answering(response_body=header_from_body_reply),
    ),
    # Headers go on at once without content-length; the body reply's header mutation is
    # too late to apply.
    _request(
        "buffered-request-header-skip",
        ext_proc=_modes(request_header_mode="SKIP", request_body_mode="BUFFERED"),
        handler=answering(request_body=header_from_body_reply),
        body=CL_BODY,
    ),
    _response(
        "buffered-response-header-skip",
        CL_REPLY,
        ext_proc=_modes(response_header_mode="SKIP", response_body_mode="BUFFERED"),
        handler=answering(response_body=header_from_body_reply),
    ),
    # -- BUFFERED_PARTIAL -----------------------------------------------------------------
    _request(
        "partial-request-under-limit",
        ext_proc=_modes(request_body_mode="BUFFERED_PARTIAL"),
        handler=answering(request_body=uppercase),
        body=CL_BODY,
        buffer_limit=SMALL_LIMIT,
    ),
    # Trailers end the body: one message with end_of_stream false, then the trailers.
    _request(
        "partial-request-trailers",
        ext_proc=_modes(request_body_mode="BUFFERED_PARTIAL", request_trailer_mode="SEND"),
        handler=answering(request_body=uppercase, request_trailers=mutate_trailers),
        body=CHUNKS,
        trailers=TRAILERS,
        buffer_limit=SMALL_LIMIT,
    ),
    _response(
        "partial-response-under-limit",
        ext_proc=_modes(response_body_mode="BUFFERED_PARTIAL"),
        handler=answering(response_body=uppercase),
        buffer_limit=SMALL_LIMIT,
    ),
    _request(
        "partial-request-over-limit",
        ext_proc=_modes(request_body_mode="BUFFERED_PARTIAL"),
        handler=answering(request_body=uppercase),
        body=BIG_CHUNKS,
        pace=(3,),
        settle=True,
        buffer_limit=SMALL_LIMIT,
        partial_limit=SMALL_LIMIT,
    ),
    _response(
        "partial-response-over-limit",
        PARTIAL_REPLY,
        ext_proc=_modes(response_body_mode="BUFFERED_PARTIAL"),
        handler=answering(response_body=uppercase),
        buffer_limit=SMALL_LIMIT,
        partial_limit=SMALL_LIMIT,
    ),
    # -- STREAMED -------------------------------------------------------------------------
    _request(
        "streamed-request-uppercase",
        ext_proc=_modes(request_body_mode="STREAMED"),
        handler=answering(request_body=uppercase),
        body=CHUNKS,
        pace=(1, 2),
        coalesce=True,
    ),
    _response(
        "streamed-response-uppercase",
        PACED_REPLY,
        ext_proc=_modes(response_body_mode="STREAMED"),
        handler=answering(response_body=uppercase),
        coalesce=True,
    ),
    _request(
        "streamed-request-clear-chunks",
        ext_proc=_modes(request_body_mode="STREAMED"),
        handler=answering(request_body=clear_then_replace_last),
        body=CHUNKS,
        pace=(1, 2),
        coalesce=True,
    ),
    _response(
        "streamed-response-clear-chunks",
        PACED_REPLY,
        ext_proc=_modes(response_body_mode="STREAMED"),
        handler=answering(response_body=clear_then_replace_last),
        coalesce=True,
    ),
    _request(
        "streamed-request-content-length",
        ext_proc=_modes(request_body_mode="STREAMED"),
        handler=answering(request_body=uppercase),
        body=CL_BODY,
        coalesce=True,
    ),
    # A header mutation in a STREAMED body reply: too late once the headers went on (paced
    # chunks); the body that arrived whole with the headers (content-length, one read) is
    # handled as BUFFERED, headers still held.
    _request(
        "streamed-request-header-mutation-paced",
        ext_proc=_modes(request_body_mode="STREAMED"),
        handler=answering(request_body=header_from_body_reply),
        body=CHUNKS,
        pace=(1, 2),
        coalesce=True,
    ),
    _request(
        "streamed-request-header-mutation-whole-body",
        ext_proc=_modes(request_body_mode="STREAMED"),
        handler=answering(request_body=header_from_body_reply),
        body=CL_BODY,
        coalesce=True,
    ),
    # A processor that replaces each body message it gets: a whole body that came early is
    # one message, so its replacement goes upstream once.
    _request(
        "streamed-request-replace-each-whole-body",
        ext_proc=_modes(request_body_mode="STREAMED"),
        handler=answering(request_body=lambda m: body_reply(m, body=b"replaced")),
        body=CL_BODY,
    ),
    _request(
        "streamed-request-whole-chunked-body-trailers",
        ext_proc=_modes(request_body_mode="STREAMED", request_trailer_mode="SEND"),
        handler=answering(request_body=header_from_body_reply, request_trailers=mutate_trailers),
        body=(CHUNKS[0] + CHUNKS[1] + CHUNKS[2],),
        trailers=TRAILERS,
    ),
    _response(
        "streamed-response-header-mutation-whole-body",
        CL_REPLY,
        ext_proc=_modes(response_body_mode="STREAMED"),
        handler=answering(response_body=header_from_body_reply),
    ),
    _response(
        "streamed-response-content-length",
        CL_REPLY,
        ext_proc=_modes(response_body_mode="STREAMED"),
        handler=answering(response_body=uppercase),
        coalesce=True,
    ),
    _request(
        "streamed-request-trailers",
        ext_proc=_modes(request_body_mode="STREAMED", request_trailer_mode="SEND"),
        handler=answering(request_body=uppercase, request_trailers=mutate_trailers),
        body=CHUNKS,
        trailers=TRAILERS,
        pace=(1, 2),
        coalesce=True,
    ),
    _response(
        "streamed-response-trailers",
        PACED_TRAILER_REPLY,
        ext_proc=_modes(response_body_mode="STREAMED", response_trailer_mode="SEND"),
        handler=answering(response_body=uppercase, response_trailers=mutate_trailers),
        coalesce=True,
    ),
    # -- FULL_DUPLEX_STREAMED -------------------------------------------------------------
    _request(
        "duplex-request-per-chunk",
        ext_proc=_modes(request_body_mode="FULL_DUPLEX_STREAMED", request_trailer_mode="SEND"),
        handler=full_duplex(bytes.upper, per_chunk=True),
        body=CHUNKS,
        pace=(1, 2),
        coalesce=True,
    ),
    _response(
        "duplex-response-per-chunk",
        PACED_REPLY,
        ext_proc=_modes(response_body_mode="FULL_DUPLEX_STREAMED", response_trailer_mode="SEND"),
        handler=full_duplex(bytes.upper, per_chunk=True),
        coalesce=True,
    ),
    _request(
        "duplex-request-reversed-at-end",
        ext_proc=_modes(request_body_mode="FULL_DUPLEX_STREAMED", request_trailer_mode="SEND"),
        handler=full_duplex(lambda b: b[::-1], per_chunk=False),
        body=CHUNKS,
        pace=(1, 2),
        coalesce=True,
    ),
    _response(
        "duplex-response-reversed-at-end",
        PACED_REPLY,
        ext_proc=_modes(response_body_mode="FULL_DUPLEX_STREAMED", response_trailer_mode="SEND"),
        handler=full_duplex(lambda b: b[::-1], per_chunk=False),
        coalesce=True,
    ),
    _request(
        "duplex-request-content-length",
        ext_proc=_modes(request_body_mode="FULL_DUPLEX_STREAMED", request_trailer_mode="SEND"),
        handler=full_duplex(lambda b: b[::-1], per_chunk=False),
        body=CL_BODY,
        coalesce=True,
    ),
    _request(
        "duplex-request-trailers",
        ext_proc=_modes(request_body_mode="FULL_DUPLEX_STREAMED", request_trailer_mode="SEND"),
        handler=full_duplex(lambda b: b[::-1], per_chunk=False),
        body=CHUNKS,
        trailers=TRAILERS,
        pace=(1, 2),
        coalesce=True,
    ),
    _response(
        "duplex-response-trailers",
        PACED_TRAILER_REPLY,
        ext_proc=_modes(response_body_mode="FULL_DUPLEX_STREAMED", response_trailer_mode="SEND"),
        handler=full_duplex(lambda b: b[::-1], per_chunk=False),
        coalesce=True,
    ),
    # -- CONTINUE_AND_REPLACE in a headers reply ------------------------------------------
    _request(
        "replace-get-gets-a-body",
        handler=answering(
            request_headers=lambda m: ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(response=common(replace=True, body=NEW_BODY))
            )
        ),
        **GET,
    ),
    # The configured BUFFERED body mode is switched off for this request: no body message.
    _request(
        "replace-post-body",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        handler=answering(
            request_headers=lambda m: ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(response=common(replace=True, body=NEW_BODY))
            )
        ),
        body=CL_BODY,
    ),
    _request(
        "replace-post-chunked-body",
        handler=answering(
            request_headers=lambda m: ep.ProcessingResponse(
                request_headers=ep.HeadersResponse(response=common(replace=True, body=NEW_BODY))
            )
        ),
        body=CHUNKS,
        trailers=TRAILERS,
    ),
    _response(
        "replace-response-body",
        CL_REPLY,
        handler=answering(
            response_headers=lambda m: ep.ProcessingResponse(
                response_headers=ep.HeadersResponse(response=common(replace=True, body=NEW_BODY))
            )
        ),
    ),
    # -- The connection after a local reply ----------------------------------------------
    # Envoy keeps an HTTP/1.1 connection after a local reply if it had read the request's end
    # when the reply's head went out (it reads on while the reply is made); otherwise the
    # reply says "connection: close" and the connection goes. A 400 always closes it.
    _redirected("local-reply-headers-get-keeps-connection", **GET),
    # The body is sent with the head, unread by the proxy when the reply comes.
    _redirected("local-reply-headers-body-sent-keeps-connection", body=CL_BODY),
    _redirected(
        "local-reply-headers-chunked-body-sent-keeps-connection", body=CHUNKS, trailers=TRAILERS
    ),
    # The body follows only once the reply is read: the connection goes.
    _redirected("local-reply-headers-body-held-closes", body=BIG, hold_from=0),
    _redirected("local-reply-headers-chunked-body-held-closes", body=CHUNKS, hold_from=1),
    # A client that asks for 100 Continue and then waits for the final answer all the same.
    _redirected(
        "local-reply-headers-expect-body-held-closes",
        headers=(("expect", "100-continue"),),
        body=CL_BODY,
        hold_from=0,
    ),
    _rejected(
        "local-reply-400-to-body-closes",
        "request_body",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        body=CL_BODY,
    ),
    _rejected("local-reply-400-to-headers-get-closes", "request_headers", **GET),
    _rejected("local-reply-400-to-response-headers-closes", "response_headers", body=CL_BODY),
    # Over the (default) limit: the rest of the body is on its way while the 413 goes
    # through the processor's response phase.
    _request(
        "local-reply-over-limit-big-body-keeps-connection",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        body=pattern(3 * DEFAULT_BUFFER_LIMIT),
        next_request=True,
    ),
    # Over the limit with the first three chunks; the rest only once the 413 is read.
    _request(
        "local-reply-over-limit-body-held-closes",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        body=BIG_CHUNKS,
        settle=True,
        hold_from=3,
        buffer_limit=SMALL_LIMIT,
        next_request=True,
    ),
    # -- ImmediateResponse in the body phase ----------------------------------------------
    _request(
        "immediate-on-request-body",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        handler=answering(
            request_body=lambda m: immediate(
                403, b"denied by body", headers=[("x-denied", "body")], details="body check"
            )
        ),
        body=CL_BODY,
        next_request=True,
    ),
    _response(
        "immediate-on-response-body",
        CL_REPLY,
        ext_proc=_modes(response_body_mode="BUFFERED"),
        handler=answering(
            response_body=lambda m: immediate(
                418, b"teapot body", headers=[("x-late", "body")], details="late body"
            )
        ),
    ),
    # The first chunk is answered (so the headers are downstream), the second one gets the
    # ImmediateResponse: Envoy can only reset. The last chunk waits for the stream's end, or
    # a proxy that reads it before taking the reply would send it on too.
    _response(
        "immediate-on-second-streamed-response-chunk",
        UpstreamReply(pace=(1,), after_end=(2,)),
        ext_proc=_modes(response_body_mode="STREAMED"),
        handler=immediate_on_response_chunk(2),
    ),
    # Whether the headers are already downstream when the first chunk's reply comes back
    # is exactly what this shows.
    _response(
        "immediate-on-first-streamed-response-chunk",
        # Paced once: after the reply to the first chunk no second body message comes to
        # pace the last chunk by.
        UpstreamReply(pace=(1,)),
        ext_proc=_modes(response_body_mode="STREAMED"),
        handler=immediate_on_response_chunk(1),
    ),
    # -- mode_override --------------------------------------------------------------------
    _response(
        "mode-override-buffered-response",
        CL_REPLY,
        ext_proc=_ext(allow_mode_override=True),
        handler=answering(request_headers=override_response_body_mode(ProcessingMode.BUFFERED)),
    ),
    _response(
        "mode-override-not-allowed-by-config",
        CL_REPLY,
        handler=answering(request_headers=override_response_body_mode(ProcessingMode.BUFFERED)),
    ),
    _response(
        "mode-override-not-in-allowed-modes",
        CL_REPLY,
        ext_proc=_ext(
            allow_mode_override=True,
            allowed_override_modes=[{"response_body_mode": "STREAMED"}],
        ),
        handler=answering(request_headers=override_response_body_mode(ProcessingMode.BUFFERED)),
    ),
    _response(
        "mode-override-in-allowed-modes",
        CL_REPLY,
        ext_proc=_ext(
            allow_mode_override=True,
            allowed_override_modes=[
                {"response_body_mode": "STREAMED"},
                {"response_body_mode": "BUFFERED"},
            ],
        ),
        handler=answering(request_headers=override_response_body_mode(ProcessingMode.BUFFERED)),
    ),
    # Answering response_headers: the override then switches the response body mode.
    _response(
        "mode-override-on-response-headers",
        CL_REPLY,
        ext_proc=_ext(allow_mode_override=True),
        handler=answering(response_headers=override_response_body_mode(ProcessingMode.BUFFERED)),
    ),
    # -- empty bodies ---------------------------------------------------------------------
    _request(
        "empty-request-content-length-0",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        body=b"",
    ),
    _request(
        "empty-request-chunked-buffered",
        ext_proc=_modes(request_body_mode="BUFFERED"),
        body=(),
    ),
    _request(
        "empty-request-chunked-streamed",
        ext_proc=_modes(request_body_mode="STREAMED"),
        body=(),
    ),
    _request(
        "empty-request-chunked-trailers-only",
        ext_proc=_modes(request_body_mode="BUFFERED", request_trailer_mode="SEND"),
        body=(),
        trailers=TRAILERS,
    ),
    _response(
        "empty-response-chunked-buffered",
        UpstreamReply(chunks=()),
        ext_proc=_modes(response_body_mode="BUFFERED"),
    ),
    _response(
        "empty-response-content-length-0",
        UpstreamReply(chunks=(), chunked=False),
        ext_proc=_modes(response_body_mode="BUFFERED"),
    ),
]


# The upstream for response-direction scenarios ---------------------------------------------


class Pacer:
    """Best-effort pacing: wait until the processor has seen ``count`` messages of a kind."""

    def __init__(self, processor: ScriptedProcessor) -> None:
        self.processor = processor
        self.missed = 0

    def seen(self, kind: str) -> int:
        return sum(
            1
            for stream in list(self.processor.streams)
            for message in list(stream.requests)
            if kind_of(message) == kind
        )

    def settle(self, kind: str) -> None:
        """Wait until the processor has seen a ``kind`` message, then SETTLE_S more."""
        self.wait(kind, 1)
        time.sleep(SETTLE_S)

    def wait_ended(self) -> None:
        """Wait until the processor's first stream has ended, at most ENDED_WAIT_S: extproc,
        blocked reading the body, acts on a reply only once the next piece comes (README:
        where extproc differs), so for it the wait runs out."""
        deadline = time.monotonic() + ENDED_WAIT_S
        while not self.processor.streams or self.processor.streams[0].end_reason is None:
            if time.monotonic() > deadline:
                self.missed += 1
                return
            time.sleep(0.01)

    def wait(self, kind: str, count: int) -> None:
        deadline = time.monotonic() + PACE_WAIT_S
        while self.seen(kind) < count:
            if time.monotonic() > deadline:
                self.missed += 1
                return
            time.sleep(0.01)


class Upstream(Protocol):
    @property
    def address(self) -> tuple[str, int]: ...

    @property
    def requests(self) -> list[ReceivedRequest]: ...


class ReplyingUpstream:
    """HTTP/1.1 on 127.0.0.1: records each request, answers each with ``reply``."""

    def __init__(self, reply: UpstreamReply, pacer: Pacer) -> None:
        self.reply = reply
        self.pacer = pacer
        self.requests: list[ReceivedRequest] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def __enter__(self) -> ReplyingUpstream:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        # Shutting a listening socket down wakes the accept() blocked on it (close does not).
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in self._connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in self._threads:
            thread.join(10)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        number = 0
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            number += 1
            with self._lock:
                self._connections.append(sock)
            self._spawn(self._serve, sock, number)

    def _serve(self, sock: socket.socket, number: int) -> None:
        sock.settimeout(UPSTREAM_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.SERVER)
        with contextlib.suppress(OSError, h11.ProtocolError):
            while self._serve_one(sock, conn, number):
                conn.start_next_cycle()

    def _serve_one(self, sock: socket.socket, conn: h11.Connection, number: int) -> bool:
        head = _next_event(sock, conn)
        if not isinstance(head, h11.Request):
            return False
        body = bytearray()
        while not isinstance(event := _next_event(sock, conn), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                return False
            body += event.data
        with self._lock:
            self.requests.append(
                ReceivedRequest(
                    method=head.method.decode(),
                    target=head.target.decode("latin-1"),
                    headers=_strs(head.headers),
                    body=bytes(body),
                    trailers=_strs(event.headers),
                    connection=number,
                )
            )
        reply = self.reply
        if reply.settle_head:
            self.pacer.settle("request_headers")
            time.sleep(SETTLE_S)
        headers = [("content-type", "text/plain")]
        if reply.chunked:
            headers.append(("transfer-encoding", "chunked"))
        else:
            headers.append(("content-length", str(sum(map(len, reply.chunks)))))
        sock.sendall(conn.send(h11.Response(status_code=reply.status, headers=headers)) or b"")
        split = min(reply.after_end, default=len(reply.chunks))
        send_body(
            reply.chunks[:split],
            lambda chunk: sock.sendall(conn.send(h11.Data(data=chunk)) or b""),
            self.pacer,
            "response",
            reply.pace,
            reply.settle,
        )
        if split < len(reply.chunks):
            self.pacer.wait_ended()
            for chunk in reply.chunks[split:]:
                sock.sendall(conn.send(h11.Data(data=chunk)) or b"")
        end = h11.EndOfMessage(headers=list(reply.trailers) if reply.chunked else [])
        sock.sendall(conn.send(end) or b"")
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE


def _next_event(sock: socket.socket, conn: h11.Connection) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(sock.recv(65536))
    return event


def _strs(headers: Any) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


@contextlib.contextmanager
def upstream_for(scenario: Scenario, pacer: Pacer) -> Iterator[Upstream]:
    if scenario.reply is None:
        with EchoUpstream() as echo:
            yield echo
    else:
        with ReplyingUpstream(scenario.reply, pacer) as replying:
            yield replying


def send_body(
    chunks: Sequence[bytes],
    write: Callable[[bytes], None],
    pacer: Pacer,
    direction: str,
    pace: tuple[int, ...],
    settle: bool,
) -> None:
    """Write the chunks of a ``direction`` ("request"/"response") body, paced and settled."""
    if settle:
        pacer.settle(f"{direction}_headers")
    for index, chunk in enumerate(chunks):
        if index in pace:
            pacer.wait(f"{direction}_body", pace.index(index) + 1)
            if settle:
                time.sleep(SETTLE_S)
        write(chunk)


# The client --------------------------------------------------------------------------------


@dataclass
class ClientResult:
    """What the client got; ``complete`` is False when the connection ended mid-response (or
    before any), ``error`` then says how."""

    response: h11.Response | None = None
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = False
    error: str | None = None
    # Scenario.next_request: what became of the GET sent after the reply.
    next_request: str | None = None


def exchange(address: tuple[str, int], scenario: Scenario, pacer: Pacer) -> ClientResult:
    """Send the scenario's request (paced when it says so) and read the reply, tolerating a
    connection that ends early."""
    result = ClientResult()
    with socket.create_connection(address, timeout=CLIENT_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.CLIENT)
        held: list[bytes] = []
        with contextlib.suppress(OSError):
            held = _send_request(sock, conn, scenario, pacer)
        try:
            _read_reply(sock, conn, result)
        except (OSError, h11.ProtocolError) as error:
            result.error = type(error).__name__
        if scenario.hold_from is not None:
            # The rest of the request, whatever the proxy made of the connection.
            with contextlib.suppress(OSError, h11.ProtocolError):
                _send_rest(sock, conn, scenario, held)
        if scenario.next_request and result.complete:
            result.next_request = _next_request(sock, conn)
    return result


def _next_request(sock: socket.socket, conn: h11.Connection) -> str:
    """Send a GET on the connection the reply came on and say what became of it: answered
    (with its status), or the connection ended (a close or a reset: which one depends on
    whether the proxy had closed before the GET reached it)."""
    # A fresh state machine: the first one may have been told "connection: close", and this
    # is to see what the proxy does, not what it announced.
    follow = h11.Connection(h11.CLIENT)
    data, closed = conn.trailing_data
    if data:
        follow.receive_data(bytes(data))
    if closed:
        follow.receive_data(b"")  # h11 reads empty data as the end of the connection
    request = h11.Request(method="GET", target="/next", headers=[("host", "example.com")])
    reply = ClientResult()
    try:
        sock.sendall((follow.send(request) or b"") + (follow.send(h11.EndOfMessage()) or b""))
        _read_reply(sock, follow, reply)
    except TimeoutError:
        return "no answer within the client timeout"
    except (OSError, h11.ProtocolError):
        return "connection ended"
    if reply.response is None or not reply.complete:
        return "connection ended"
    return f"answered {reply.response.status_code}"


def _send_request(
    sock: socket.socket, conn: h11.Connection, scenario: Scenario, pacer: Pacer
) -> list[bytes]:
    """Send the request, or its head and the chunks before Scenario.hold_from; the chunks
    held back."""
    headers = [("host", "example.com"), *scenario.headers]
    body = scenario.body
    if isinstance(body, tuple):
        headers.append(("transfer-encoding", "chunked"))
        chunks = list(body)
    elif body is not None:
        headers.append(("content-length", str(len(body))))
        chunks = [body] if body else []
    else:
        chunks = []
    sock.sendall(
        conn.send(h11.Request(method=scenario.method, target=scenario.target, headers=headers))
        or b""
    )
    held = chunks[scenario.hold_from :] if scenario.hold_from is not None else []
    send_body(
        chunks[: len(chunks) - len(held)],
        lambda chunk: sock.sendall(conn.send(h11.Data(data=chunk)) or b""),
        pacer,
        "request",
        scenario.pace,
        scenario.settle,
    )
    if scenario.hold_from is None:
        sock.sendall(conn.send(h11.EndOfMessage(headers=list(scenario.trailers))) or b"")
    return held


def _send_rest(
    sock: socket.socket, conn: h11.Connection, scenario: Scenario, held: list[bytes]
) -> None:
    for chunk in held:
        sock.sendall(conn.send(h11.Data(data=chunk)) or b"")
    sock.sendall(conn.send(h11.EndOfMessage(headers=list(scenario.trailers))) or b"")


def _read_reply(sock: socket.socket, conn: h11.Connection, result: ClientResult) -> None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.Response):
            result.response = event
        elif isinstance(event, h11.Data):
            result.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            result.trailers = _strs(event.headers)
            result.complete = True
            return
        else:
            result.error = type(event).__name__
            return


def client_view(result: ClientResult) -> dict[str, Any]:
    """parity.client_view of the reply, plus whether it was complete.

    An incomplete reply's body is not compared: how much of it got out before the connection
    ended depends on timing (it is in the notes).
    """
    if result.response is None:
        return {"status": None, "complete": False}
    reply = Reply(
        result.response.status_code,
        _strs(result.response.headers),
        result.body,
        result.trailers,
        result.response.http_version,
    )
    view = parity.client_view(reply)
    view["complete"] = result.complete
    if not result.complete:
        view["body"] = "<incomplete>"
    return view


# Normalising what the processor saw --------------------------------------------------------


def coalesce(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive body messages of one direction merged: bodies concatenated, the last
    message's end_of_stream kept, and whether any earlier one had end_of_stream (it never
    should)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        last = merged[-1] if merged else None
        if message["kind"] in BODY_KINDS and last is not None and last["kind"] == message["kind"]:
            last["earlier_end_of_stream"] = last["earlier_end_of_stream"] or last["end_of_stream"]
            last["body"] += message["body"]
            last["end_of_stream"] = message["end_of_stream"]
            last["grpc_flags"] = sorted(set(last["grpc_flags"]) | set(message["grpc_flags"]))
            last["messages"] = "<one or more>"
        elif message["kind"] in BODY_KINDS:
            merged.append({**message, "earlier_end_of_stream": False, "messages": "<one or more>"})
        else:
            merged.append(message)
    return merged


def partial_view(observation: dict[str, Any], scenario: Scenario) -> None:
    """BUFFERED_PARTIAL over the limit: the processor's one body message has at least
    ``partial_limit`` bytes, a prefix of the body; what went on is its uppercase then the rest
    unmodified. Both are replaced by those facts, true or false."""
    assert scenario.partial_limit is not None
    sent = BIG
    for stream in observation["processor"]:
        for message in stream:
            if message["kind"] not in BODY_KINDS:
                continue
            part: bytes = message["body"]
            expected = part.upper() + sent[len(part) :]
            message["body"] = {
                "at least the limit": len(part) >= scenario.partial_limit,
                "less than the whole body": len(part) < len(sent),
                "a prefix of the body": sent.startswith(part),
            }
            for place in _forwarded_bodies(observation, message["kind"]):
                if place["body"] in (expected, expected.decode("latin-1")):
                    place["body"] = "<the processed part, then the rest unmodified>"


def _forwarded_bodies(observation: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """Where the body of direction ``kind`` shows, as dicts with a "body" (bytes, or the
    echo's str): the upstream's requests and their echo, or the client's reply."""
    if kind == "response_body":
        return [observation["client"]]
    places: list[dict[str, Any]] = list(observation["upstream"])
    echo = observation["client"].get("body")
    if isinstance(echo, dict) and isinstance(echo.get("body"), str):
        places.append(echo)
    return places


# Running one side --------------------------------------------------------------------------


@dataclass
class Observation:
    compared: dict[str, Any]
    notes: dict[str, Any]


ProxyFactory = Callable[
    [Scenario, tuple[str, int], tuple[str, int], Path, dict[str, Any]],
    contextlib.AbstractContextManager[tuple[str, int]],
]


@contextlib.contextmanager
def through_envoy(
    scenario: Scenario,
    upstream: tuple[str, int],
    processor: tuple[str, int],
    workdir: Path,
    notes: dict[str, Any],
) -> Iterator[tuple[str, int]]:
    access_log = workdir / "envoy" / "access.log"
    hcm = {
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(access_log),
                    "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                },
            }
        ]
    }
    envoy = EnvoyProxy(
        upstream=upstream,
        processor=processor,
        ext_proc=scenario.ext_proc,
        workdir=workdir / "envoy",
        hcm=hcm,
        trailers=True,
        buffer_limit_bytes=scenario.buffer_limit,
        log_level=os.environ.get("BODIES_PARITY_ENVOY_LOG", "warn"),
    )
    with envoy:
        yield envoy.address
        with contextlib.suppress(Exception):
            notes["envoy_counters"] = {
                name.removeprefix("http.ingress."): value
                for name, value in sorted(envoy.stats().items())
                if value
                and name.startswith(("http.ingress.ext_proc.", "http.ingress.downstream_rq_"))
            }
    with contextlib.suppress(OSError):
        notes["envoy_access_log"] = access_log.read_text().splitlines()
    notes["envoy_log"] = envoy.log_path.read_text(errors="replace")


@contextlib.contextmanager
def through_extproc(
    scenario: Scenario,
    upstream: tuple[str, int],
    processor: tuple[str, int],
    workdir: Path,
    notes: dict[str, Any],
) -> Iterator[tuple[str, int]]:
    # xff=False matches Envoy's default of not appending X-Forwarded-For.
    extra: dict[str, Any] = {}
    if scenario.buffer_limit is not None:
        extra["buffer_limit_bytes"] = scenario.buffer_limit
    target = f"{processor[0]}:{processor[1]}"
    with running_proxy(upstream, target, ext_proc=scenario.ext_proc, xff=False, **extra) as server:
        yield server.address


def observe(scenario: Scenario, proxy: ProxyFactory, workdir: Path) -> Observation:
    """Run the scenario through one proxy; what the client, upstream and processor saw."""
    notes: dict[str, Any] = {}
    with ScriptedProcessor(scenario.handler) as processor:
        pacer = Pacer(processor)
        with upstream_for(scenario, pacer) as upstream:
            processor_at = ("127.0.0.1", processor.port)
            with proxy(scenario, upstream.address, processor_at, workdir, notes) as address:
                result = exchange(address, scenario, pacer)
            # The proxy is stopped, so every stream it opened has ended on its side.
            opened = max(scenario.streams, len(processor.streams))
            streams = processor.wait_streams(opened, STREAMS_DONE_S)
            assert processor.errors == [], f"the processor's handler failed: {processor.errors}"
            received = list(upstream.requests)
    for r in received:
        assert parity.has_request_id(r.headers), f"no x-request-id upstream: {r.headers}"
    echo = None
    if scenario.reply is None and len(received) == 1:
        echo = parity.echo_length(received[0])
    processor_view = parity.processor_view(streams, echo)
    if scenario.coalesce:
        processor_view = [coalesce(messages) for messages in processor_view]
    compared: dict[str, Any] = {
        "client": client_view(result),
        "upstream": parity.upstream_view(received),
        "processor": processor_view,
    }
    if scenario.next_request:
        compared["next_request"] = result.next_request
    if scenario.partial_limit is not None:
        partial_view(compared, scenario)
    notes.update(
        client_error=result.error,
        client_partial_body=None if result.complete else result.body,
        pacing_missed=pacer.missed,
        processor_messages=[
            [
                (
                    kind_of(m),
                    len(body_of(m)) if kind_of(m) in BODY_KINDS else None,
                    eos_of(m) if kind_of(m) not in TRAILER_KINDS else None,
                )
                for m in s.requests
            ]
            for s in streams
        ],
        stream_end=[s.end_reason for s in streams],
    )
    return Observation(compared, notes)


# Differences kept on purpose, each with the reason; docs/protocol.md "Where extproc differs".
DELIBERATE: dict[str, str] = {}


def _params() -> list[Any]:
    return [
        pytest.param(
            s,
            id=s.id,
            marks=[pytest.mark.xfail(strict=True, reason=DELIBERATE[s.id])]
            if s.id in DELIBERATE
            else [],
        )
        for s in SCENARIOS
    ]


@pytest.mark.parametrize("scenario", _params())
def test_bodies_parity(scenario: Scenario, tmp_path: Path) -> None:
    require_envoy()
    envoy = observe(scenario, through_envoy, tmp_path).compared
    extproc = observe(scenario, through_extproc, tmp_path).compared
    assert envoy == extproc, parity.readable_diff(envoy, extproc, ("envoy", "extproc"))


def test_scenario_ids_are_unique() -> None:
    ids = [s.id for s in SCENARIOS]
    assert len(ids) == len(set(ids))


# Reading one scenario's observation --------------------------------------------------------


def _short(value: Any) -> Any:
    """Long byte strings shortened for reading."""
    if isinstance(value, bytes) and len(value) > 120:
        return f"<{len(value)} bytes: {value[:40]!r}...{value[-20:]!r}>"
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_short(v) for v in value)
    return value


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    side: ProxyFactory = through_envoy
    if "--extproc" in args:
        args.remove("--extproc")
        side = through_extproc
    by_id = {s.id: s for s in SCENARIOS}
    if not args:
        print("\n".join(by_id))
        return 0
    for name in args:
        scenario = by_id[name]
        print(f"=== {name}", flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            try:
                observation = observe(scenario, side, Path(workdir))
            except Exception as error:  # noqa: BLE001 - reported, then the next scenario
                print(f"FAILED: {type(error).__name__}: {error}")
                continue
        pprint.pprint(_short(observation.compared), width=100, sort_dicts=False)
        print("--- notes")
        notes = dict(observation.notes)
        log = notes.pop("envoy_log", None)
        pprint.pprint(_short(notes), width=100, sort_dicts=False)
        if log and os.environ.get("BODIES_PARITY_ENVOY_LOG"):
            print(log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
