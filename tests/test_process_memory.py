"""safesail.process_memory: the resident set now, and returning freed heap to the system between stages."""

from __future__ import annotations

import sys

import pytest

from safesail.process_memory import release, rss_mib


def test_rss_is_read_from_proc():
    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/self/status is Linux only")
    assert rss_mib() > 10


def test_release_hands_freed_heap_back():
    """Many medium blocks (heap, not mmap) freed behind a live one stay resident until malloc_trim."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    blocks = [bytearray(b"x" * 100_000) for _ in range(3000)]      # ~300 MB of 100 kB heap chunks
    keep = bytearray(b"y" * 100_000)                                # a live block above them
    del blocks
    before = rss_mib()
    if not release():
        pytest.skip("no malloc_trim in this C library")
    after = rss_mib()
    assert keep[0] == ord("y")
    assert before - after > 100, (before, after)                    # most of the 300 MB went back
