"""The client of a processor, by its transport: a gRPC channel (:mod:`extproc.io.processor`)
or, for Envoy's ``http_service``, a pool of HTTP connections (:mod:`extproc.io.http_processor`).
Both open one :class:`~extproc.io.processor.ProcessorStream` per HTTP exchange."""

from __future__ import annotations

from extproc.config import ProcessorSettings
from extproc.io.http_processor import HttpClient
from extproc.io.processor import ProcessorClient

Client = ProcessorClient | HttpClient


def open_client(settings: ProcessorSettings, max_streams: int = 64) -> Client:
    if settings.http is not None:
        return HttpClient(settings, max_streams)
    return ProcessorClient(settings, max_streams)
