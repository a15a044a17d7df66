"""The sufficiency judge on a thread of its own, so that it works while the source model generates.

The judge (the `llm` group's client, the local Qwen explainer by default) and the source model
(SmolLM2) are both CPU-bound torch work that releases the GIL; run one after the other, the
stage's main thread waited ~30% of its time on the judge (BENCHMARKS.md, issue 15, session 3).
`BackgroundJudge` runs every judge call on one worker thread (so the client's event loop is
only ever driven from that thread), `submit` returns at once, and the stage asks for the
verdicts only when a unit's records are built, so a wave's questions are answered while the
next wave (or the rest of this one) generates.

Threads: the judge's torch work runs in its event loop's default executor, one thread whose
torch intra-op thread count is `judge_threads`; while the judge is busy the main thread uses
`main_threads - judge_threads` (at least 1) and its own `main_threads` again once the judge is
idle (`ThreadGovernor`, asked before every batch of `generation.py`), so the two together
use the cores the stage was given instead of twice as many.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
from collections.abc import Callable

import torch


class BackgroundJudge:
    """`judge(items) -> replies` run on one worker thread; `submit` returns a future, a call waits."""

    def __init__(self, judge: Callable[[list], list], loop: asyncio.AbstractEventLoop | None = None,
                 judge_threads: int | None = None):
        self._judge = judge
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-judge")
        self._busy = 0
        self._lock = threading.Lock()
        if loop is not None and judge_threads:
            n = int(judge_threads)
            loop.set_default_executor(cf.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="verify-judge-torch", initializer=torch.set_num_threads,
                initargs=(n,)))

    @property
    def busy(self) -> bool:
        return self._busy > 0

    def _run(self, items: list) -> list:
        try:
            return self._judge(items)
        finally:
            with self._lock:
                self._busy -= 1

    def submit(self, items: list) -> cf.Future:
        with self._lock:
            self._busy += 1
        return self._pool.submit(self._run, items)

    def __call__(self, items: list) -> list:
        return self.submit(items).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ThreadGovernor:
    """The main thread's torch threads: `main_threads` while the judge is idle, fewer while it works."""

    def __init__(self, judge: BackgroundJudge, main_threads: int, judge_threads: int):
        self.judge, self.full = judge, max(1, int(main_threads))
        self.shared = max(1, self.full - int(judge_threads))
        self.switches = 0

    def __call__(self) -> None:
        want = self.shared if self.judge.busy else self.full
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
            self.switches += 1


def overlap_judge(judge: Callable[[list], list] | None, loop: asyncio.AbstractEventLoop):
    """(the judge on its own thread, a function that ends it) for the stage; with two or more torch threads
    the judge gets one and the main thread the rest while the judge works (`ThreadGovernor`)."""
    from safesail.verify import generation

    if judge is None:
        return None, lambda: None
    main = torch.get_num_threads()
    bg = BackgroundJudge(judge, loop, judge_threads=1 if main > 1 else None)
    generation.before_batch = ThreadGovernor(bg, main, 1) if main > 1 else None

    def end() -> None:
        generation.before_batch = None
        bg.close()
        torch.set_num_threads(main)
    return bg, end


def judge_engine_counter(client) -> Callable[[], dict | None]:
    """A function giving the judge's local-engine work since now (prompt tokens asked for, tokens computed:
    the rest came from its prefix cache, forward calls), or None for a back end without an engine."""
    engine = None
    while client is not None and engine is None:
        engine = getattr(client, "engine", None)
        client = getattr(client, "inner", None)
    stats = getattr(engine, "stats", None)
    if stats is None:
        return lambda: None
    start = (stats.prompt_tokens, stats.computed_tokens, stats.forward_calls)

    def delta() -> dict:
        asked, computed, calls = (stats.prompt_tokens - start[0], stats.computed_tokens - start[1],
                                  stats.forward_calls - start[2])
        return {"prompt_tokens": asked, "computed_tokens": computed, "forward_calls": calls,
                "prefix_reuse": round(1 - computed / asked, 3) if asked else None}
    return delta
