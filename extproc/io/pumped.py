"""Replies drained by a pump thread into a queue, read by the worker: shared by both clients."""

from __future__ import annotations

import queue
from dataclasses import dataclass

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.errors import ProcessorStreamError, ProcessorTimeout


@dataclass(frozen=True, slots=True)
class End:
    """The pump's last item: how the stream ended."""

    code: int
    details: str


Replies = queue.SimpleQueue[ep.ProcessingResponse | End]


def recv(replies: Replies, timeout: float) -> ep.ProcessingResponse | None:
    """``ProcessorStream.recv`` once a pump fills ``replies``."""
    try:
        item = replies.get(timeout=max(timeout, 0))
    except queue.Empty:
        raise ProcessorTimeout(f"no reply within {timeout:g}s") from None
    if isinstance(item, End):
        replies.put(item)  # the end stays the answer to every later recv
        if item.code == 0:
            return None
        raise ProcessorStreamError(item.code, item.details)
    return item
