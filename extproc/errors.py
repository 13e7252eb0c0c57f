"""The exception tree of extproc.

Every class carries ``status_hint``: the HTTP status the proxy answers with when the error ends
a request, so the I/O layer never needs an ``isinstance`` ladder to choose one. Leaves that are
also timeouts subclass :class:`TimeoutError`, so callers may catch either.
"""

from __future__ import annotations


class ExtProcError(Exception):
    """Root of every error extproc raises on purpose."""

    status_hint = 500


class ConfigError(ExtProcError):
    """A configuration value is wrong; ``option`` names the field or flag."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class ClientProtocolError(ExtProcError):
    """The downstream client broke HTTP/1.1; the status is h11's hint (400, 431, ...)."""

    def __init__(self, message: str, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class ProcessorError(ExtProcError):
    """Something went wrong on the ext_proc side stream."""


class ProcessorTimeout(ProcessorError, TimeoutError):
    """The processor did not answer a message within message_timeout."""

    status_hint = 504


class ProcessorStreamError(ProcessorError):
    """The stream ended with a non-OK gRPC status (``code`` is the numeric status)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"gRPC status {code}: {details}")
        self.code = code
        self.details = details


class UpstreamError(ExtProcError):
    """The upstream could not be reached or broke before its response head."""

    status_hint = 503


class UpstreamConnectError(UpstreamError):
    """Connecting to the upstream failed."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not answer within the upstream timeout."""

    status_hint = 504
