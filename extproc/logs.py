"""structlog set-up for the proxy: JSON lines or a console format, on standard error.

``configure`` is called by the command line or by an embedding host, never at import, so a
host keeps control of its own logging.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

FORMATS = ("json", "console")
LEVELS = ("debug", "info", "warning", "error")

# The level configure() set; None while the host's own structlog set-up decides.
configured_level: int | None = None


def keeps(level: int) -> bool:
    """Whether a line at ``level`` is written: known when extproc configured logging, left to
    the host's loggers otherwise (any wrapper class, filtering or not)."""
    return configured_level is None or level >= configured_level


def configure(fmt: str = "json", level: str = "info") -> None:
    global configured_level
    configured_level = logging.getLevelNamesMapping()[level.upper()]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(configured_level),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
