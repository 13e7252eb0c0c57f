"""The proxy as a library: run extproc inside another Python process, on a background thread.

:class:`Proxy` is a thin lifecycle wrapper around :class:`extproc.io.server.ProxyServer`; the
serving itself (workers, keep-alive, draining) is the same code the CLI runs.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from extproc.config import ProxyConfig, build_config, load_file, parse_file_data
from extproc.io.server import ProxyServer

__all__ = ["Proxy"]


class Proxy:
    """One embedded proxy: ``Proxy(config).start()``, ``.address``, ``.stop()``."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._server: ProxyServer | None = None

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> Proxy:
        """A config file as ``--config`` reads it; keyword arguments are the CLI's flags by
        their :class:`extproc.options.Options` names, and win over the environment's
        ``EXTPROC_*`` variables, which win over the file."""
        return cls(build_config(load_file(Path(path)), options))

    @classmethod
    def from_options(
        cls,
        *,
        ext_proc: dict[str, Any] | None = None,
        **options: Any,
    ) -> Proxy:
        """``ext_proc`` is any of the config file's three shapes, as a dict; keyword arguments
        are the CLI's flags by their :class:`extproc.options.Options` names (``listen``,
        ``upstream``, ``processor``, ``message_timeout``, ...), as in :meth:`from_file`."""
        file = parse_file_data(ext_proc) if ext_proc is not None else None
        return cls(build_config(file, options))

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect (the real port when the config asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the proxy is not running: call start() first")
        return self._server.address

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> Proxy:
        """Bind and serve on a background thread.

        ProxyServer binds and listens in its constructor, so by the time this returns the
        kernel already queues connections for the acceptor: no readiness wait is needed, and
        an address in use raises OSError here, in the caller's thread.
        """
        if self._server is not None:
            raise RuntimeError("the proxy is already running")
        self._server = ProxyServer(self.config).start()
        return self

    def stop(self) -> None:
        """Stop accepting and let in-flight requests finish (within the drain timeout).
        Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> Proxy:
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
