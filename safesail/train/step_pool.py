"""Stepping the SAEs of one batch: one after the other, or overlapping on threads (CPU sweeps)."""

from __future__ import annotations

import torch


class StepPool:
    """Runs the SAE steps of one batch one after the other, or on `workers` threads (torch ops
    release the GIL), splitting the intra-op threads between them so they overlap, not contend."""

    def __init__(self, workers: int, n_saes: int):
        self.workers = max(1, min(int(workers or 1), n_saes or 1))
        self.ex = None
        self.threads_before = torch.get_num_threads()
        if self.workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(max(1, self.threads_before // self.workers))
            self.ex = ThreadPoolExecutor(self.workers, thread_name_prefix="sae-step")

    def map(self, fn, items):
        return list(map(fn, items)) if self.ex is None or len(items) < 2 else list(self.ex.map(fn, items))

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown()
            torch.set_num_threads(self.threads_before)
            self.ex = None
