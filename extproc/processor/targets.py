"""Where a served processor comes from: an instance, a class, a factory, or ``module:Class``.

Shared by every transport (gRPC in :mod:`extproc.processor.service`, HTTP in
:mod:`extproc.processor.wsgi`) and by the ``extproc-processor`` command.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from extproc.processor.base import Processor

ProcessorSource = Processor | type[Processor] | Callable[[], Processor]


def processor_factory(source: ProcessorSource) -> Callable[[], Processor]:
    """A callable giving the Processor for one stream."""
    # An instance is shared by every stream (its per-request state belongs in ctx.state); a
    # class or factory gives each stream its own, so ``self`` is per request too.
    if isinstance(source, Processor):
        return lambda: source
    return source


def import_processor(target: str) -> type[Processor]:
    """``module:Class`` to the class; ValueError with the reason when it is not one."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{target!r}: expected module:Class")
    # Like uvicorn or gunicorn: modules next to where the command runs are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 (any import failure is the user's to see)
        raise ValueError(f"cannot import {module_name!r}: {err}") from err
    found = getattr(module, attr, None)
    if not (isinstance(found, type) and issubclass(found, Processor)):
        what = "not found" if found is None else f"is not a Processor subclass ({found!r})"
        raise ValueError(f"{module_name}:{attr} {what}")
    return found
