"""Explanation scores: Pearson correlation of simulated vs true activations, or a named failure.

The score of a latent is the Pearson correlation over all scored tokens of its score
set (activating segments and random negatives concatenated), as in the OpenAI
neuron-explainer and Safe-SAIL. It is undefined, and recorded as a failure rather
than as 0 or NaN, when there are fewer than two tokens or either side is constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SCORE_FAILURES = {
    "no_explanation": "the explain stage produced no explanation for this latent",
    "no_score_segments": "the collect stage left no held-out segments to score on",
    "too_few_tokens": "fewer than two scored tokens",
    "constant_true": "the true activations are constant over the score set",
    "constant_prediction": "the simulator predicted the same value for every token",
    "non_finite": "an activation or prediction is not a finite number",
    "segments_failed": "too many segments could not be simulated (their reasons are in `segments`)",
}
_REL_EPS = 1e-9


class ScoreUndefined(Exception):
    def __init__(self, code: str, detail: str = ""):
        assert code in SCORE_FAILURES, code
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


def pearson(true: list[float], pred: list[float]) -> float:
    """Pearson correlation; raises `ScoreUndefined` where it is not defined."""
    if len(true) != len(pred):
        raise ValueError(f"length mismatch: {len(true)} true values, {len(pred)} predictions")
    n = len(true)
    if n < 2:
        raise ScoreUndefined("too_few_tokens", f"{n} scored token(s)")
    if not all(math.isfinite(v) for v in true) or not all(math.isfinite(v) for v in pred):
        raise ScoreUndefined("non_finite")
    mt = math.fsum(true) / n
    mp = math.fsum(pred) / n
    dt = [v - mt for v in true]
    dp = [v - mp for v in pred]
    st = math.fsum(d * d for d in dt)
    sp = math.fsum(d * d for d in dp)
    if st <= (_REL_EPS * max(1.0, max(abs(v) for v in true))) ** 2 * n:
        raise ScoreUndefined("constant_true", f"all {n} true activations are {true[0]:.4g}")
    if sp <= (_REL_EPS * max(1.0, max(abs(v) for v in pred))) ** 2 * n:
        raise ScoreUndefined("constant_prediction", f"all {n} predictions are {pred[0]:.4g}")
    r = math.fsum(a * b for a, b in zip(dt, dp)) / math.sqrt(st * sp)
    return max(-1.0, min(1.0, r))


@dataclass
class SegmentSim:
    """One scored segment with its simulation (pred None and failure set when it failed)."""
    segment_id: str
    kind: str
    tokens: list[str]
    true: list[float]
    pred: list[float] | None = None
    failure: str | None = None

    def as_record(self) -> dict:
        rec = {"segment_id": self.segment_id, "kind": self.kind, "tokens": self.tokens,
               "true": [round(float(v), 6) for v in self.true],
               "pred": None if self.pred is None else [round(float(v), 4) for v in self.pred]}
        if self.failure:
            rec["failure"] = self.failure
        return rec


@dataclass
class LatentScore:
    score: float | None
    failure: str | None
    segments: list[SegmentSim] = field(default_factory=list)
    n_tokens: int = 0


def score_segments(segments: list[SegmentSim], min_ok_fraction: float = 1.0) -> LatentScore:
    """The latent's score from its simulated segments.

    Segments whose simulation failed are left out only if at least `min_ok_fraction`
    of the segments simulated; otherwise the latent fails with `segments_failed` and
    the first segment's reason.
    """
    if not segments:
        return LatentScore(None, "no_score_segments: the score set is empty", segments, 0)
    ok = [s for s in segments if s.pred is not None and s.failure is None]
    failed = [s for s in segments if s not in ok]
    if failed and len(ok) < min_ok_fraction * len(segments) - 1e-9:
        first = failed[0]
        return LatentScore(None, f"segments_failed: {len(failed)} of {len(segments)} segments failed "
                                 f"(first, {first.segment_id}: {first.failure})", segments, 0)
    true = [float(v) for s in ok for v in s.true]
    pred = [float(v) for s in ok for v in s.pred]
    try:
        return LatentScore(pearson(true, pred), None, segments, len(true))
    except ScoreUndefined as e:
        return LatentScore(None, str(e), segments, len(true))
