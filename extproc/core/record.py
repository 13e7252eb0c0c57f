"""One request's record: what happened to it, written once as it goes and read when it ends.

The exchange writes its part (the processor traffic, and what ended processing early), the
I/O side its own (the request line, status, bytes and times). The access-log line and the
stats both read the same record, so neither parses what another module wrote for people.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from google.protobuf import struct_pb2


def envoy_details(text: str) -> str:
    """Response code details as Envoy writes them: each whitespace character becomes ``_``
    (StringUtil::replaceAllEmptySpace), so a run of spaces stays a run."""
    return text.translate(_SPACES_TO_UNDERSCORES)


_SPACES_TO_UNDERSCORES = str.maketrans(dict.fromkeys(" \t\n\v\f\r", "_"))


class Ending(enum.Enum):
    """What ended processing before every message was answered."""

    PROCESSOR_CLOSED = "processor_closed"  # the processor closed the stream OK while in use
    STREAM_ERROR = "stream_error"  # the stream failed (a non-OK status) while in use
    MESSAGE_TIMEOUT = "message_timeout"
    BAD_REPLY = "bad_reply"  # spurious, of an unknown kind, or an immediate response disabled
    MUTATION_ERROR = "mutation_error"  # a reply's mutation broke the rules or the body length
    IMMEDIATE_RESPONSE = "immediate_response"
    HTTP_ERROR = "http_error"  # an http_service processor's POST failed
    # A buffered response body over the limit: Envoy's core answers that 500, not ext_proc.
    RESPONSE_TOO_LARGE = "response_too_large"


@dataclass(slots=True)
class RequestRecord:
    """Everything the access log and the stats know of one request. Times are in seconds."""

    # The request, as the I/O side received it.
    started: float = 0.0  # time.monotonic() when the request began
    method: bytes = b""
    path: bytes = b""
    request_id: bytes = b""
    # The exchange's part.
    messages_sent: int = 0
    messages_received: int = 0
    spurious: int = 0
    rejected_mutations: int = 0
    override_timeout_received: int = 0
    override_timeout_ignored: int = 0
    override_timeout_out_of_range: int = 0  # of those ignored: under 1 ms or over the maximum
    ending: Ending | None = None  # None: processing ran its course (or never began)
    failed_open: bool = False  # the ending's error was let through (failure_mode_allow)
    stream_error: int | None = None  # the gRPC status of a stream that failed, whenever it did
    request_too_large: bool = False  # Envoy's core answered 413 for a buffered request body
    # The ending's error as Envoy's details put it, also when it was let through (failed_open).
    fault: str = ""
    # Why an http_service processor's POST failed (ProcessorHttpFailed.reason), for the log.
    http_failure: str = ""
    # Envoy's response code details (%RESPONSE_CODE_DETAILS%), written by whoever made the reply;
    # empty for the upstream's own response.
    details: str = ""
    # What the processor returned, by namespace (receiving_namespaces only); made on first use.
    dynamic_metadata: dict[str, struct_pb2.Struct] | None = None
    # The I/O side's part.
    over_http: bool = False  # an http_service processor: one POST per message, no stream
    status: int = 0  # sent to the client; 0 when nothing was
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_time: float = 0.0  # until the upstream's (or the app's) response head
    upstream_answered: bool = False  # the upstream (or the app) made the response
    processor_time: float = 0.0  # spent waiting for processor replies
    # Time waited for replies, by the ProcessingResponse field that ended the wait
    # ("request_headers", ...; "message_timeout" and "stream_end" otherwise); made on first use.
    phase_times: dict[str, float] | None = None
    duration: float = 0.0  # set when the request ends

    @property
    def stream_started(self) -> bool:
        # The exchange opens the stream with its first message.
        return self.messages_sent > 0

    @property
    def answered_locally(self) -> bool:
        """Whether ext_proc made the reply: the processor's immediate response, or ext_proc's
        own reply to an error it did not let through (Envoy counts both alike)."""
        return (
            self.ending is not None
            and self.ending is not Ending.PROCESSOR_CLOSED
            and not self.failed_open
        )
