"""X-Request-Id values for requests that come without one."""

from __future__ import annotations

import os
import threading
import uuid

# They come from os.urandom in batches, as Envoy buffers its random bytes: one getrandom
# syscall (which lets go of the GIL) per batch, not one per request. Per thread, so no lock;
# emptied in a forked child, which must not repeat its parent's ids.
_ID_BATCH = 128
_ids = threading.local()
os.register_at_fork(after_in_child=lambda: _ids.__dict__.clear())


def new_request_id() -> bytes:
    """A random (version 4) UUID, as text."""
    batch: list[bytes] | None = getattr(_ids, "batch", None)
    if not batch:
        data = os.urandom(16 * _ID_BATCH)
        batch = _ids.batch = [
            str(uuid.UUID(bytes=data[i : i + 16], version=4)).encode()
            for i in range(0, len(data), 16)
        ]
    return batch.pop()
