"""The score summary: per scorer, own vs controls, the own-beats-shuffled rate, cost, and a plain warning."""

from __future__ import annotations

from safesail.interpret.scoring.records import ScoreRecord
from safesail.interpret.scoring.summary import summarize, summary_lines


def _rec(latent, kind, value, shuffled, calls=2):
    return ScoreRecord("h", 1, latent, kind, value=value, control_shuffled=shuffled, control_constant=0.5,
                       beats_shuffled=None if value is None or shuffled is None else value > shuffled,
                       llm_calls=calls, prompt_tokens=100 * calls, status="ok" if value is not None else "failed",
                       failure=None if value is not None else "one_class: x",
                       details={"controls": {"shuffled": {"llm_calls": calls}, "constant": {"llm_calls": calls}}})


def test_weak_explainer_is_named_per_scorer():
    recs = [_rec(i, "detection", 0.9, 0.5) for i in range(4)] + [_rec(4, "detection", 0.4, 0.5)]
    recs += [_rec(i, "simulation", 0.3, 0.4) for i in range(3)] + [_rec(3, "simulation", None, 0.1)]
    s = summarize(recs, min_beats_rate=0.8)
    det, sim = s["kinds"]["detection"], s["kinds"]["simulation"]
    assert (det["beats_shuffled"], det["compared"], det["beats_shuffled_rate"]) == (4, 5, 0.8)
    assert (sim["scored"], sim["failed"], sim["failures"], sim["beats_shuffled_rate"]) == (3, 1, {"one_class": 1}, 0.0)
    assert sim["pass_0.2"] == 3 and det["calls_per_latent"] == 2 and det["control_calls_per_latent"] == 4
    assert len(s["warnings"]) == 1 and "too weak for simulation" in s["warnings"][0]
    text = "\n".join(summary_lines(s))
    assert "own beats shuffled in 4 of 5 (80%)" in text and "WARNING: the explainer is too weak for simulation" in text
