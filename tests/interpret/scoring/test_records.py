"""The scores.jsonl record: one reader and one writer, last record per (hook, latent, kind) wins."""

from __future__ import annotations

import json

import pytest

from safesail.interpret.scoring.records import ScoreRecord, ScoreWriter, read_scores, scores_by_latent


def _rec(latent, kind, value, **kw):
    return ScoreRecord(hook="layers.1.mlp_out", layer=1, latent=latent, kind=kind, value=value, **kw)


def test_round_trip_last_per_kind_and_torn_line(tmp_path):
    path = tmp_path / "scores.jsonl"
    with ScoreWriter(path) as w:
        w.write(_rec(3, "simulation", 0.1))
        w.write(_rec(3, "detection", 0.8, ci_low=0.6, ci_high=0.9, control_shuffled=0.5, beats_shuffled=True,
                     details={"auroc": 0.85}))
        w.write(_rec(3, "simulation", 0.4))  # a re-run replaces the first
    with open(path, "a") as f:
        f.write('{"hook": "layers.1.mlp_out", "lat')  # torn by a kill
    with ScoreWriter(path) as w:  # the writer ends the torn line first
        w.write(_rec(4, "fuzzing", None, status="failed", failure="no_explanation: empty"))
    recs = read_scores(path)
    assert set(recs) == {("layers.1.mlp_out", 3, "simulation"), ("layers.1.mlp_out", 3, "detection"),
                         ("layers.1.mlp_out", 4, "fuzzing")}
    assert recs[("layers.1.mlp_out", 3, "simulation")].value == 0.4
    det = recs[("layers.1.mlp_out", 3, "detection")]
    assert det.beats_shuffled is True and det.details == {"auroc": 0.85} and det.ok
    assert recs[("layers.1.mlp_out", 4, "fuzzing")].failure_code == "no_explanation"
    assert set(read_scores(path, kinds=["detection"])) == {("layers.1.mlp_out", 3, "detection")}
    assert set(scores_by_latent(path)[("layers.1.mlp_out", 3)]) == {"simulation", "detection"}


def test_one_scorer_records_read_as_simulation(tmp_path):
    path = tmp_path / "scores.jsonl"
    old = {"hook": "layers.7.mlp_out", "layer": 7, "latent": 42, "status": "ok", "score": 0.41, "failure": None,
           "kind": "simulation", "mode": "logprobs", "llm_calls": 9, "prompt_tokens": 2210,
           "segments": [{"segment_id": "3"}, {"segment_id": "9"}]}
    path.write_text(json.dumps(old) + "\n")
    (r,) = read_scores(path).values()
    assert (r.kind, r.value, r.llm_calls, r.n_examples) == ("simulation", 0.41, 9, 2)
    assert r.details["mode"] == "logprobs"


def test_bad_values_are_refused_or_cleaned():
    with pytest.raises(ValueError):
        _rec(1, "embedding", 0.1)
    with pytest.raises(ValueError):
        _rec(1, "simulation", 0.1, status="maybe")
    assert _rec(1, "simulation", float("nan")).value is None
