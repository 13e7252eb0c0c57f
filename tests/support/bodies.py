"""Processor scripts that transform bodies, for the body-mode tests."""

from __future__ import annotations

from collections.abc import Callable

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from tests.support.processor import Handler, ProcessorStream, matching_reply

Transform = Callable[[bytes], bytes]


def body_reply(message: ep.ProcessingRequest, body: bytes) -> ep.ProcessingResponse:
    common = ep.CommonResponse(body_mutation=ep.BodyMutation(body=body))
    return matching_reply(message, common)


def transform(fn: Transform) -> Handler:
    """Answer every body message (BUFFERED, STREAMED, BUFFERED_PARTIAL) with fn(body)."""

    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            kind = message.WhichOneof("request")
            if kind.endswith("_body"):
                stream.send(body_reply(message, fn(getattr(message, kind).body)))
            else:
                stream.send(matching_reply(message))

    return handler


def streamed_body(direction: str, body: bytes, end_of_stream: bool) -> ep.ProcessingResponse:
    mutation = ep.BodyMutation(
        streamed_response=ep.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
    )
    response = ep.ProcessingResponse()
    getattr(response, f"{direction}_body").response.body_mutation.CopyFrom(mutation)
    return response


def duplex(fn: Transform) -> Handler:
    """FULL_DUPLEX_STREAMED: collect each direction's body, stream fn(body) back at its end."""

    def handler(stream: ProcessorStream) -> None:
        bodies = {"request": bytearray(), "response": bytearray()}
        while (message := stream.recv()) is not None:
            kind = message.WhichOneof("request")
            direction, _, phase = kind.partition("_")
            if phase == "headers":
                stream.send(matching_reply(message))
                if message.request_headers.end_of_stream or (
                    message.response_headers.end_of_stream
                ):
                    continue
            elif phase == "body":
                part = getattr(message, kind)
                bodies[direction] += part.body
                if part.end_of_stream:
                    stream.send(streamed_body(direction, fn(bytes(bodies[direction])), True))
            else:
                stream.send(streamed_body(direction, fn(bytes(bodies[direction])), False))
                stream.send(matching_reply(message))

    return handler


def duplex_per_chunk(fn: Transform) -> Handler:
    """FULL_DUPLEX_STREAMED: stream fn(chunk) back for each body message as it comes."""

    def handler(stream: ProcessorStream) -> None:
        while (message := stream.recv()) is not None:
            kind = message.WhichOneof("request")
            direction, _, phase = kind.partition("_")
            if phase == "body":
                part = getattr(message, kind)
                stream.send(streamed_body(direction, fn(part.body), part.end_of_stream))
            else:
                stream.send(matching_reply(message))

    return handler
