"""On-disk SQLite response cache shared by every LLM back end.

The key is a hash of the full request: back end, model, method and every
parameter. A re-run (or a run restarted after a crash) repeats no LLM call
whose answer was stored. Errors are never cached. Identical requests in flight
at the same time share one call. SQLite in WAL mode, so several processes may
share one file; within a process all access runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from safesail.interpret.clients.base import CallStats, ChatRequest, Completion, LLMClient, LLMError, PromptLogprobs

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
  key TEXT PRIMARY KEY,
  method TEXT NOT NULL,
  request TEXT NOT NULL,
  response TEXT NOT NULL,
  created REAL NOT NULL
)
"""


def request_key(identity: dict, method: str, params: dict) -> tuple[str, str]:
    """(sha256 hex key, canonical JSON) of a request."""
    canon = json.dumps({"id": identity, "method": method, "params": params}, sort_keys=True,
                       ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest(), canon


class ResponseCache:
    """A key -> JSON store in one SQLite file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, method: str, request: str, response: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO responses (key, method, request, response, created) "
                         "VALUES (?, ?, ?, ?, ?)", (key, method, request, json.dumps(response, ensure_ascii=False),
                                                     time.time()))
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class CachedClient(LLMClient):
    """Wraps a back end: answers from the cache when it can, stores every successful reply."""

    def __init__(self, inner: LLMClient, path: Path):
        self.inner = inner
        self.cache = ResponseCache(path)
        self.stats = CallStats()
        self._inflight: dict[str, asyncio.Future] = {}

    # Pass-throughs of the wrapped back end's properties.
    @property
    def model_name(self) -> str:  # type: ignore[override]
        return self.inner.model_name

    @property
    def supports_prompt_logprobs(self) -> bool:  # type: ignore[override]
        return self.inner.supports_prompt_logprobs

    @property
    def context_window(self) -> int:  # type: ignore[override]
        return self.inner.context_window

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def chat_prompt(self, messages: list[dict]) -> str | None:
        return self.inner.chat_prompt(messages)

    def count_message_tokens(self, messages: list[dict]) -> int:
        return self.inner.count_message_tokens(messages)

    def cache_identity(self) -> dict[str, Any]:
        return self.inner.cache_identity()

    async def ensure_ready(self) -> None:
        await self.inner.ensure_ready()

    async def _cached(self, method: str, params: dict, call: Callable[[], Awaitable[dict]]) -> tuple[dict, bool]:
        await self.inner.ensure_ready()
        key, canon = request_key(self.inner.cache_identity(), method, params)
        self.stats.calls += 1
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.hits += 1
            return hit, True
        if key in self._inflight:  # the same request is already on its way: share its answer
            self.stats.hits += 1
            return await asyncio.shield(self._inflight[key]), True
        self.stats.misses += 1
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value = await call()
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # mark retrieved: waiters (if any) re-raise it
            raise
        finally:
            self._inflight.pop(key, None)
        self.cache.put(key, method, canon, value)
        fut.set_result(value)
        return value, False

    async def chat(self, req: ChatRequest) -> Completion:
        async def call() -> dict:
            return dataclasses.asdict(await self.inner.chat(req))

        params = dataclasses.asdict(req)
        if not params.get("attempt"):
            params.pop("attempt", None)  # first tries keep the keys they had before `attempt` existed
        value, hit = await self._cached("chat", params, call)
        comp = Completion(**{**value, "cached": hit})
        if not hit:
            self.stats.prompt_tokens += comp.prompt_tokens
            self.stats.completion_tokens += comp.completion_tokens
        return comp

    async def prompt_logprobs(self, prompt: str, candidates: list[str],
                              slots_ending_with: str | None = None) -> PromptLogprobs:
        params: dict[str, Any] = {"prompt": prompt, "candidates": list(candidates)}
        kw = {} if slots_ending_with is None else {"slots_ending_with": slots_ending_with}
        params.update(kw)

        async def call() -> dict:
            return dataclasses.asdict(await self.inner.prompt_logprobs(prompt, candidates, **kw))

        value, hit = await self._cached("prompt_logprobs", params, call)
        out = PromptLogprobs(**{**value, "cached": hit})
        if not hit:
            self.stats.prompt_tokens += out.prompt_tokens
        return out

    def log_stats(self, logger: logging.Logger | None = None) -> None:
        s = self.stats
        (logger or log).info("LLM response cache %s: %d calls, %d hits, %d misses (hit rate %.0f%%)",
                             self.cache.path, s.calls, s.hits, s.misses, 100 * s.hit_rate)

    async def aclose(self) -> None:
        self.log_stats()
        await self.inner.aclose()
        self.cache.close()


__all__ = ["CachedClient", "ResponseCache", "request_key", "LLMError"]
