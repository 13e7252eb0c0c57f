"""The processor SDK: write an ext_proc processor as a few Python hooks.

The other half of the protocol from the proxy: subclass :class:`Processor`, override the hooks
for the phases you care about, return a decision, and :func:`serve` it (or run
``extproc-processor module:Class``). The SDK speaks the Envoy ``ExternalProcessor`` protocol,
so a processor written with it works behind Envoy as well as behind extproc. :func:`wsgi_app`
serves the same processor over Envoy's ``http_service`` transport (JSON over HTTP) instead.
"""

from __future__ import annotations

from extproc.processor.base import Body, Headers, Processor, StreamContext
from extproc.processor.decisions import (
    Continue,
    Decision,
    ModeOverride,
    Mutate,
    ReplaceAndContinue,
    Respond,
    RespondError,
    processing_mode,
    with_metadata,
    with_mode,
)
from extproc.processor.wsgi import wsgi_app

__all__ = [
    "Body",
    "Continue",
    "Decision",
    "Headers",
    "ModeOverride",
    "Mutate",
    "Processor",
    "ReplaceAndContinue",
    "Respond",
    "RespondError",
    "StreamContext",
    "processing_mode",
    "with_metadata",
    "with_mode",
    "wsgi_app",
]
