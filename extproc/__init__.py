"""extproc: Envoy's ext_proc filter as a blocking HTTP/1.1 proxy, a library and WSGI middleware.

The public names are imported on first use, so ``import extproc.processor`` (the processor SDK)
does not pull in the proxy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from extproc.embed import Proxy
    from extproc.wsgi import ExtProcMiddleware

__all__ = ["ExtProcMiddleware", "Proxy"]

_LAZY = {
    "Proxy": "extproc.embed",
    "ExtProcMiddleware": "extproc.wsgi",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'extproc' has no attribute {name!r}")
