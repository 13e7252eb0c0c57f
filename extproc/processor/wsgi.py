"""Serve a :class:`Processor` over plain HTTP, Envoy's ext_proc ``http_service`` transport.

Each ``ProcessingRequest`` arrives as its own ``POST``, in proto3 JSON, and the reply is a
``200`` carrying the ``ProcessingResponse`` in JSON. :func:`wsgi_app` makes that a WSGI app, so
any WSGI server runs it (gunicorn, or ``extproc-processor --http``).

The events of one HTTP request come as separate POSTs tied by the ``x-request-id`` header (the
ext_proc stream id), so each stream's :class:`StreamDispatcher`, and with it ``ctx.state``, is
kept between them in a bounded LRU. That works only when the POSTs of a request reach the same
process: threads share it, separate worker processes do not.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import json_format

from extproc.processor.base import Processor
from extproc.processor.dispatch import StreamDispatcher
from extproc.processor.targets import ProcessorSource, import_processor, processor_factory

_log = logging.getLogger("extproc.processor")

# Streams whose next event may still come. Envoy keeps a stream open from request_headers to
# response_headers, so this bounds the requests in flight whose state is remembered; past it
# the least recently used stream is forgotten (its next event then starts with a fresh ctx).
MAX_STREAMS = 4096
# A header event is a few KiB of JSON; this refuses bodies that could not be one.
MAX_BODY_BYTES = 4 * 1024 * 1024
STREAM_ID_HEADER = "HTTP_X_REQUEST_ID"
# The last event http_service sends: bodies and trailers never travel over it.
_LAST_PHASE = "response_headers"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _Refused(Exception):
    def __init__(self, status: str, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(reason)
        self.status = status
        self.headers = headers


class _Streams:
    """Open streams' dispatchers by stream id: a thread-safe LRU of at most ``limit``."""

    def __init__(self, new_processor: Callable[[], Processor], limit: int) -> None:
        self._new_processor = new_processor
        self._limit = limit
        self._lock = threading.Lock()
        self._open: OrderedDict[str, StreamDispatcher] = OrderedDict()

    def take(self, stream_id: str) -> StreamDispatcher:
        """The stream's dispatcher, removed while its event is handled (a new one if unknown).

        Taking it out means two POSTs with one id at once each get their own dispatcher rather
        than sharing one across threads.
        """
        with self._lock:
            found = self._open.pop(stream_id, None) if stream_id else None
        return found if found is not None else StreamDispatcher(self._new_processor())

    def keep(self, stream_id: str, dispatcher: StreamDispatcher) -> None:
        if not stream_id:
            return
        with self._lock:
            self._open[stream_id] = dispatcher
            while len(self._open) > self._limit:
                self._open.popitem(last=False)


def _read_body(environ: dict[str, Any]) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isdigit():
        if int(length) > MAX_BODY_BYTES:
            raise _Refused("413 Content Too Large", "request body too large")
        data: bytes = stream.read(int(length))
        return data
    if environ.get("wsgi.input_terminated"):
        # The server de-chunked the body (gunicorn does) and ends the stream at its end.
        data = stream.read(MAX_BODY_BYTES + 1)
        if len(data) > MAX_BODY_BYTES:
            raise _Refused("413 Content Too Large", "request body too large")
        return data
    raise _Refused("411 Length Required", "content-length required by this server")


def _parse(body: bytes) -> tuple[ep.ProcessingRequest, str]:
    request = ep.ProcessingRequest()
    try:
        json_format.Parse(body.decode("utf-8"), request, ignore_unknown_fields=True)
    except (UnicodeDecodeError, json_format.ParseError) as err:
        raise _Refused("400 Bad Request", f"not a JSON ProcessingRequest: {err}") from err
    phase = request.WhichOneof("request")
    if phase is None:
        raise _Refused("400 Bad Request", "ProcessingRequest carries no phase")
    return request, phase


def _text(
    status: str, reason: str, start_response: StartResponse, extra: Iterable[tuple[str, str]] = ()
) -> list[bytes]:
    body = f"{reason}\n".encode()
    start_response(
        status,
        [("content-type", "text/plain"), ("content-length", str(len(body))), *extra],
    )
    return [body]


def wsgi_app(processor: ProcessorSource | str, *, max_streams: int = MAX_STREAMS) -> WsgiApp:
    """A WSGI app serving ``processor`` as Envoy's ext_proc ``http_service`` expects.

    ``processor`` is what :func:`extproc.processor.service.serve` takes (an instance, a class
    or a factory) or a ``"module:Class"`` string, so gunicorn can build the app itself:
    ``gunicorn 'extproc.processor:wsgi_app("mymodule:Hello")'``.

    Answers ``200 application/json`` with the ProcessingResponse; 400 when the body is not a
    JSON ProcessingRequest with a phase, 405 to anything but POST, 411 for a body of unknown
    length the server did not de-chunk, 413 past :data:`MAX_BODY_BYTES`, 500 when a hook
    raises (logged). Any content type is accepted: the body is read as JSON regardless.
    """
    source = import_processor(processor) if isinstance(processor, str) else processor
    streams = _Streams(processor_factory(source), max_streams)

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return _text("405 Method Not Allowed", "POST only", start_response, [("allow", "POST")])
        stream_id = environ.get(STREAM_ID_HEADER, "")
        try:
            request, phase = _parse(_read_body(environ))
        except _Refused as refused:
            return _text(refused.status, str(refused), start_response)
        dispatcher = streams.take(stream_id)
        try:
            reply = dispatcher.handle(request)
        except Exception as err:  # noqa: BLE001 (any hook failure fails only this event)
            _log.exception("processor hook failed")
            return _text(
                "500 Internal Server Error", f"{type(err).__name__}: {err}", start_response
            )
        if not (dispatcher.finished or phase == _LAST_PHASE):
            streams.keep(stream_id, dispatcher)
        # In observability mode the proxy ignores the reply, but a 200 needs a body all the same.
        message = reply if reply is not None else ep.ProcessingResponse()
        body = json_format.MessageToJson(
            message, preserving_proto_field_name=True, indent=None
        ).encode()
        start_response(
            "200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))]
        )
        return [body]

    return app
