"""One model, many requests: a lock with a bounded queue and a deadline.

Requests that find `max_pending` others already running or waiting are refused
at once (`Busy`), so a crowd never piles up behind a slow model; a request that
waits past its deadline is refused too.
"""

from __future__ import annotations

import contextlib
import threading
import time


class Busy(Exception):
    """The model is serving others and the queue is full (or the wait ran out)."""


class ModelGate:
    def __init__(self, max_pending: int):
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    @contextlib.contextmanager
    def slot(self, timeout_s: float | None = None):
        """Hold the model for the block; yields the seconds spent waiting."""
        with self._count:
            if self._pending >= self.max_pending:
                raise Busy(f"{self._pending} requests are already running or waiting")
            self._pending += 1
        t0 = time.perf_counter()
        try:
            got = self._lock.acquire(timeout=-1 if timeout_s is None else max(timeout_s, 0.0))
            if not got:
                raise Busy(f"waited {timeout_s:.0f} s for the model")
            try:
                yield time.perf_counter() - t0
            finally:
                self._lock.release()
        finally:
            with self._count:
                self._pending -= 1
