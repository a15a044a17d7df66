"""The sufficiency judge on a thread of its own, so that it works while the source model generates.

The judge (the `llm` group's client, the local Qwen explainer by default) and the source model
(SmolLM2) are both CPU-bound torch work that releases the GIL; run one after the other, the
stage's main thread waited ~30% of its time on the judge (BENCHMARKS.md, issue 15, session 3).
`BackgroundJudge` runs every judge call on one worker thread (so the client's event loop is
only ever driven from that thread), `submit` returns at once, and the stage asks for the
verdicts only when a unit's records are built, so a wave's questions are answered while the
next wave (or the rest of this one) generates.

Threads: the judge's torch work runs in its event loop's default executor, one thread whose
torch intra-op thread count is set per job (`_JudgeExecutor`): `judge_threads` while the main thread
works, and the stage's `main_threads` while the main thread waits for a reply (`BackgroundJudge.wait`,
or a call): then SmolLM2 has nothing to do and its core would idle (session 4's idle run: the main
thread waited 222 s of 694 on the judge). While the judge is busy the main thread uses
`main_threads - judge_threads` (at least 1) and its own `main_threads` again once the judge is
idle (`ThreadGovernor`, asked before every batch of `generation.py`), so the two together
use the cores the stage was given instead of twice as many (a judge job started while the main
thread waited keeps its threads to its end: one engine batch, a few seconds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
from collections.abc import Callable

import torch


class _JudgeExecutor(cf.ThreadPoolExecutor):
    """One worker thread whose torch intra-op threads are set at the start of every job to `threads()`."""

    def __init__(self, threads: Callable[[], int]):
        super().__init__(max_workers=1, thread_name_prefix="verify-judge-torch")
        self._threads_now = threads
        self.jobs_by_threads: dict[int, int] = {}

    def submit(self, fn, /, *args, **kwargs):
        def job():
            n = max(1, int(self._threads_now()))
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
            self.jobs_by_threads[n] = self.jobs_by_threads.get(n, 0) + 1
            return fn(*args, **kwargs)
        return super().submit(job)


class BackgroundJudge:
    """`judge(items) -> replies` run on one worker thread; `submit` returns a future, `wait(future)` or a
    call waits (and while anyone waits the judge's torch work gets `main_threads` threads, else
    `judge_threads`)."""

    def __init__(self, judge: Callable[[list], list], loop: asyncio.AbstractEventLoop | None = None,
                 judge_threads: int | None = None, main_threads: int | None = None):
        self._judge = judge
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-judge")
        self._busy = 0
        self._waiting = 0
        self._lock = threading.Lock()
        self.executor: _JudgeExecutor | None = None
        if loop is not None and judge_threads:
            self.judge_threads = int(judge_threads)
            self.main_threads = max(self.judge_threads, int(main_threads or judge_threads))
            self.executor = _JudgeExecutor(self.torch_threads)
            loop.set_default_executor(self.executor)

    @property
    def busy(self) -> bool:
        return self._busy > 0

    @property
    def waited_on(self) -> bool:
        return self._waiting > 0

    def torch_threads(self) -> int:
        """The judge's torch threads for a job starting now: all the stage's while the main thread waits."""
        return self.main_threads if self._waiting > 0 else self.judge_threads

    def wait(self, fut: cf.Future):
        """`fut.result()`, the judge's next jobs getting the main thread's cores meanwhile."""
        with self._lock:
            self._waiting += 1
        try:
            return fut.result()
        finally:
            with self._lock:
                self._waiting -= 1

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
        with self._lock:
            self._waiting += 1      # counted before the job starts, so its first batch gets the threads
        try:
            return self.submit(items).result()
        finally:
            with self._lock:
                self._waiting -= 1

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
    the judge gets one and the main thread the rest while both work (`ThreadGovernor`), and all of them
    while the main thread waits for it (`BackgroundJudge.wait`)."""
    from safesail.verify import generation

    if judge is None:
        return None, lambda: None
    main = torch.get_num_threads()
    bg = BackgroundJudge(judge, loop, judge_threads=1 if main > 1 else None, main_threads=main)
    generation.before_batch = ThreadGovernor(bg, main, 1) if main > 1 else None

    def end() -> None:
        generation.before_batch = None
        bg.close()
        torch.set_num_threads(main)
    return bg, end


def judge_engine_counter(client) -> Callable[[], dict | None]:
    """A function giving the judge's local-engine work since now (prompt tokens asked for, tokens computed:
    the rest came from its prefix cache, forward calls), or None for a back end without an engine."""
    from safesail.interpret.clients.base import client_with

    stats = getattr(getattr(client_with(client, "engine"), "engine", None), "stats", None)
    if stats is None:
        return lambda: None
    start = (stats.prompt_tokens, stats.computed_tokens, stats.forward_calls)

    def delta() -> dict:
        asked, computed, calls = (stats.prompt_tokens - start[0], stats.computed_tokens - start[1],
                                  stats.forward_calls - start[2])
        return {"prompt_tokens": asked, "computed_tokens": computed, "forward_calls": calls,
                "prefix_reuse": round(1 - computed / asked, 3) if asked else None}
    return delta


def judge_batches(client, batch_size: int | None) -> None:
    """Let the judge's local back end batch `batch_size` requests per engine call (`verify.judge_batch_size`;
    None: keep the llm group's). Requests of one topic differ only in their text, so a bigger batch is one
    forward over more continuations after one shared prefix: 16 instead of 4 cost ~6% less CPU on the
    1.5B judge (BENCHMARKS.md, issue 15, session 5). Back ends without `batch_size` are left alone."""
    from safesail.interpret.clients.base import client_with

    local = client_with(client, "batch_size") if batch_size else None
    if local is not None:
        local.batch_size = int(batch_size)
