"""The proxy command's allocator tuning (its effect is measured by bench/soak.py)."""

from __future__ import annotations

import platform

from extproc.io.memory import pin_mmap_threshold


def test_mmap_threshold_is_pinned_where_glibc_is() -> None:
    assert pin_mmap_threshold() is (platform.libc_ver()[0] == "glibc")
