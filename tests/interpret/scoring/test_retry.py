"""A `score` re-run re-sends every item that failed with a retryable error (issue 16, item 6), for
every scorer, and nothing else: answered items come from the response cache."""

from __future__ import annotations

import json

import pytest

from safesail.errors import UserError
from safesail.interpret.clients.cache import CachedClient
from safesail.interpret.scoring.records import read_scores
from safesail.interpret.scoring.stage import run_score_stage
from safesail.rundir import RunDir
from sim_fakes import FakeJudge

HOOK = "layers.1.mlp_out"


def _write_run(cfg):
    rd = RunDir.from_cfg(cfg)
    rd.latents(HOOK).mkdir(parents=True)
    segs = []
    for i in range(6):  # segments 2 and 4 hold the token the flaky back end fails on
        toks = ["We", " ate", " pizza", " zz" if i == 2 else " at", " noon"] if i < 4 else \
            ["A", " quiet", " zz" if i == 4 else " old", " road", f" {i}"]
        acts = [0.0, 0.0, 1.0 + i, 0.0, 0.0] if i < 4 else [0.0] * 5
        segs.append({"hook": HOOK, "latent": 3, "segment_id": i, "split": "score", "level": i if i < 4 else None,
                     "kind": "activating" if i < 4 else "random", "doc_id": i, "start": 0, "tokens": toks,
                     "acts": acts})
    (rd.latents(HOOK) / "segments.jsonl").write_text("".join(json.dumps(s) + "\n" for s in segs))
    rd.interpret.mkdir(parents=True)
    expls = [{"hook": HOOK, "layer": 1, "latent": 3, "status": "ok", "explanation": "pizza"},
             {"hook": HOOK, "layer": 1, "latent": 5, "status": "ok", "explanation": "rivers"}]
    (rd.interpret / "explanations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in expls))
    return rd


def test_rerun_resends_every_retryable_item(smoke_cfg, monkeypatch):
    cfg = smoke_cfg("score.segments_per_call=1", "score.detection.batch_size=1", "score.fuzzing.batch_size=1",
                    "score.controls=[shuffled]", "score.max_latents=1")
    rd = _write_run(cfg)
    inner = FakeJudge(fail_on=" zz")
    monkeypatch.setattr("safesail.interpret.clients.make_client",
                        lambda *a, **k: CachedClient(inner, rd.interpret / "llm_cache.sqlite"))
    run_score_stage(cfg, [])
    first = read_scores(rd.interpret / "scores.jsonl")
    expected_retry = {"simulation": 2, "detection": 2, "fuzzing": 2}  # fuzzing: segment 2 right and fuzzed
    for kind, n in expected_retry.items():
        rec = first[(HOOK, 3, kind)]
        retry = [it for it in rec.details["items"] if it["status"] == "retryable"]
        assert len(retry) == n and rec.status == "failed"
        assert all(it["failure"].startswith("llm_error: server_error") for it in retry)
        ctrl = rec.details["controls"]["shuffled"]["items"]
        assert sum(it["status"] == "retryable" for it in ctrl) == n
    assert RunDir(rd.root).stage_record("score") is None  # not done: there is something to retry

    inner.failing = False
    inner.calls.clear()
    run_score_stage(cfg, [])
    sent = [c[1] if c[0] == "prompt_logprobs" else c[1].messages[-1]["content"] for c in inner.calls]
    # every failed item went out again (own + shuffled control, per scorer), and nothing else
    assert len(sent) == 2 * sum(expected_retry.values()) and all(" zz" in p for p in sent)
    again = read_scores(rd.interpret / "scores.jsonl")
    for kind in expected_retry:
        rec = again[(HOOK, 3, kind)]
        assert all(it["status"] == "ok" for it in rec.details["items"]) and rec.status == "ok"
    assert rec.value is not None and RunDir(rd.root).stage_record("score") is not None
    inner.calls.clear()
    run_score_stage(cfg, [])
    assert inner.calls == []


def test_a_torn_record_is_redone_and_the_rest_stand(smoke_cfg, monkeypatch):
    cfg = smoke_cfg("score.controls=[]", "score.max_latents=1")
    rd = _write_run(cfg)
    inner = FakeJudge()
    monkeypatch.setattr("safesail.interpret.clients.make_client",
                        lambda *a, **k: CachedClient(inner, rd.interpret / "llm_cache.sqlite"))
    run_score_stage(cfg, [])
    lines = (rd.interpret / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 3
    (rd.stages / "score.json").unlink()
    (rd.interpret / "scores.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])
    inner.calls.clear()
    run_score_stage(cfg, [])
    assert len(read_scores(rd.interpret / "scores.jsonl")) == 3 and inner.calls == []  # from the cache
    changed = smoke_cfg("score.controls=[]", "score.max_latents=1", "score.detection.batch_size=2")
    run_score_stage(changed, [])
    kinds = [json.loads(line)["kind"] for line in (rd.interpret / "scores.jsonl").read_text().splitlines()[3:]
             if line.startswith("{") and line.endswith("}")]
    assert kinds[-1] == "detection" and "simulation" not in kinds[-1:]  # only the changed scorer is redone
    with pytest.raises(UserError, match="score.scorers"):
        run_score_stage(smoke_cfg("score.scorers=[]"), [])
