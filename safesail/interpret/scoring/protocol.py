"""What every scorer shares: the examples it reads, the run it returns, and the interface.

A scorer (`Scorer`) reads one latent's held-out score segments (`Example`: activating
segments from every activation level and random negatives) and one explanation, and
returns a `ScorerRun`: the value (or a named failure), one status per scored item, the
LLM cost, kind-specific metrics, and `resample`, the value recomputed on a resample of
the items (for the bootstrap interval). A scorer never raises for a model's mistake.

Per-item status: "ok"; "retryable" (the LLM call failed: a re-run re-sends it, the
response cache makes every other item free); "failed" (the model's answer could not be
used: parsing, alignment, context). Codes are those of `simulator.FAILURE_CODES`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Protocol

RETRYABLE_CODES = frozenset({"llm_error"})


def item_status(failure: str | None) -> str:
    """The status of one scored item from its failure string ("<code>: <detail>" or None)."""
    if failure is None:
        return "ok"
    return "retryable" if failure.split(":", 1)[0] in RETRYABLE_CODES else "failed"


@dataclass
class Example:
    """One held-out score segment of a latent (a `split: score` record of collect's segments.jsonl)."""
    segment_id: str
    kind: str                # "activating" | "random"
    level: int | None        # activation level (activating segments), None for random ones
    tokens: list[str]
    acts: list[float]
    source: dict = field(default_factory=dict, repr=False)  # the segment record (doc_id, start, ...)

    @classmethod
    def from_segment(cls, rec: dict) -> "Example":
        level = rec.get("level")
        return cls(str(rec["segment_id"]), str(rec.get("kind", "")), None if level is None else int(level),
                   list(rec["tokens"]), [float(a) for a in rec["acts"]], rec)

    @property
    def activating(self) -> bool:
        return self.kind == "activating" and max(self.acts, default=0.0) > 0


@dataclass
class Cost:
    llm_calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other) -> None:
        for name in ("llm_calls", "cached_calls", "prompt_tokens", "completion_tokens"):
            setattr(self, name, getattr(self, name) + int(getattr(other, name, 0) or 0))

    def as_dict(self) -> dict:
        return {"llm_calls": self.llm_calls, "cached_calls": self.cached_calls,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass
class ScorerRun:
    value: float | None
    failure: str | None
    items: list[dict]                      # per scored item: id, level, label/true, prediction, status, failure
    n_examples: int
    cost: Cost = field(default_factory=Cost)
    metrics: dict = field(default_factory=dict)   # kind-specific figures (AUROC, per-level accuracy, ...)
    resample: Callable[[list[int]], float | None] | None = None  # value on items[i] for i in the list
    seconds: float = 0.0

    @property
    def retryable(self) -> int:
        return sum(1 for it in self.items if it.get("status") == "retryable")


class Scorer(Protocol):
    kind: str

    def identity(self) -> dict:
        """What a stored record must match to stand (LLM, mode, prompt version, settings)."""

    async def score(self, explanation: str, examples: list[Example]) -> ScorerRun:
        """Score one explanation on one latent's examples."""


def gate(sem: asyncio.Semaphore | None) -> asyncio.Semaphore:
    """The semaphore bounding LLM requests in flight (a private one when none is shared)."""
    return sem if sem is not None else asyncio.Semaphore(1)
