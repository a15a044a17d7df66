"""Process memory between pipeline stages: the resident set now, and handing freed heap back.

`safesail run` runs every stage in one process. A stage's freed tensors and Python objects
often stay in the C allocator's heap and arenas (glibc keeps freed chunks for reuse; worker
threads each get an arena of their own), so the resident set after a stage can stay near its
peak although little is alive, and the next stage's large buffers (mapped afresh) stack on
top of it. `release()` collects garbage and asks glibc to return free heap pages to the
system (`malloc_trim(0)`, all arenas); elsewhere it only collects garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

_LIBC = None


def rss_mib() -> float | None:
    """The resident set of this process now (VmRSS, MiB); None where /proc is not readable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib() -> float:
    """The peak resident set of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _libc():
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
        if _LIBC is not False and not hasattr(_LIBC, "malloc_trim"):
            _LIBC = False
    return _LIBC or None


def release() -> bool:
    """gc.collect(), then glibc's malloc_trim(0); True when the trim ran (glibc found)."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True
