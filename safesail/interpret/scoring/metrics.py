"""Figures of the detection and fuzzing scorers, and the bootstrap interval of every scorer.

* `balanced_accuracy`: mean of the true-positive and true-negative rates (0.5 is chance,
  whatever the share of positives); undefined when a class is absent.
* `auroc`: probability that a random positive gets a higher score than a random negative
  (ties count half); from the back end's yes-probabilities where it returns logprobs.
* `accuracy_by_level`: share of correct answers per activation level (and "random").
* `bootstrap_interval`: percentile interval of a value recomputed on resamples of its
  items (with replacement), with a fixed seed so a re-run reproduces it.
"""

from __future__ import annotations

import random
from typing import Callable


def balanced_accuracy(labels: list[bool], preds: list[bool]) -> float | None:
    pos = [p for y, p in zip(labels, preds) if y]
    neg = [p for y, p in zip(labels, preds) if not y]
    if not pos or not neg:
        return None
    return 0.5 * (sum(pos) / len(pos) + sum(not p for p in neg) / len(neg))


def auroc(labels: list[bool], scores: list[float]) -> float | None:
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def accuracy_by_level(levels: list, labels: list[bool], preds: list[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for lv, y, p in zip(levels, labels, preds):
        groups.setdefault("random" if lv is None else str(lv), []).append(bool(y) == bool(p))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def bootstrap_interval(value_of: Callable[[list[int]], float | None], n_items: int, n_boot: int = 200,
                       level: float = 0.95, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile interval over `n_boot` resamples; resamples where the value is undefined are left out
    (none defined, or fewer than half: no interval)."""
    if n_items < 2 or n_boot < 1:
        return None, None
    rng = random.Random(seed)
    vals = []
    for _ in range(n_boot):
        v = value_of([rng.randrange(n_items) for _ in range(n_items)])
        if v is not None:
            vals.append(float(v))
    if len(vals) < max(1, n_boot // 2):
        return None, None
    vals.sort()
    lo = vals[int((1 - level) / 2 * (len(vals) - 1))]
    hi = vals[int(round((1 + level) / 2 * (len(vals) - 1)))]
    return lo, hi
