"""Process-wide allocator tuning for the proxy command (not for embedding: the host owns it).

glibc raises its mmap threshold each time a large block (a body piece, a gRPC message) is
freed; from then on such blocks come from the per-thread malloc arenas, which fragment under
many threads, so the proxy's RSS creeps up for as long as traffic runs (bench/soak.py: about
20 MiB in 5 minutes at 32 connections). Fixing the threshold at glibc's default keeps large
blocks in mmap, returned on free, and RSS flat. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own default, which mallopt makes fixed


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc mallopt."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
