"""The exception tree of extproc.

One root, :class:`ExtProcError`; a middle class per concern (configuration, the processor, the
upstream, an exchange that cannot go on); leaves that are also timeouts subclass
:class:`TimeoutError`, so callers may catch either. What status a failed request is answered
with is decided where the failure is met (the request loop, the driver): a class does not carry
one.
"""

from __future__ import annotations


class ExtProcError(Exception):
    """Root of every error extproc raises on purpose."""


class ConfigError(ExtProcError):
    """A configuration value is wrong; ``option`` names the field or flag."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class ProcessorError(ExtProcError):
    """Something went wrong on the ext_proc side stream."""


class ProcessorTimeout(ProcessorError, TimeoutError):
    """The processor did not answer a message within message_timeout."""


class ProcessorStreamError(ProcessorError):
    """The stream ended with a non-OK gRPC status (``code`` is the numeric status)."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"gRPC status {code}: {details}")
        self.code = code
        self.details = details


class ProcessorHttpError(ProcessorError):
    """An http_service processor's POST failed: not 200, no JSON ProcessingResponse, its
    connection lost, or its http_uri.timeout passed."""


class UpstreamError(ExtProcError):
    """The upstream could not be reached or broke before its response head."""


class UpstreamConnectError(UpstreamError):
    """Connecting to the upstream failed."""


class ExchangeAborted(ExtProcError):
    """The exchange cannot go on: the client's connection goes without (more of) a reply (a
    local reply after the response's head went out, an upstream or a client that broke
    mid-body)."""


class ClientBodyError(ExchangeAborted):
    """The request body broke HTTP/1.1 framing (400) or stalled past the client timeout (408)
    after its head went on: answered so if no response has started, then the connection goes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class RequestStopped(ExchangeAborted):
    """Raised to a WSGI app reading wsgi.input: ext_proc answered the request (an immediate
    response, an error, a body over the limit), so the rest of the body will not come. The
    app's answer, if it makes one, is dropped for ext_proc's."""
