"""`safesail score` end to end on a hand-made run directory, with the real local transformers back
end on the tiny model (logprobs mode and JSON mode), every scorer and both controls."""

from __future__ import annotations

import json
import sqlite3

import pytest
from omegaconf import OmegaConf

from safesail.errors import UserError
from safesail.interpret.scoring.records import read_scores
from safesail.interpret.scoring.stage import run_score_stage
from safesail.interpret.scoring.simulator import FAILURE_CODES
from safesail.rundir import RunDir

HOOK = "layers.1.mlp_out"


def _cfg(smoke_cfg, *overrides):
    cfg = smoke_cfg(*overrides)
    cfg.llm = OmegaConf.merge(cfg.llm, {"name": "tiny", "context_window": 512, "batch_size": 4})
    cfg.llm.model = cfg.model  # the tiny random model is the simulator
    return cfg


def _write_run(cfg, tokenizer):
    rd = RunDir.from_cfg(cfg)
    seg_dir = rd.latents(HOOK)
    seg_dir.mkdir(parents=True)
    texts = ["The cat sat on the mat.", "Bombs and guns were found.", "A quiet morning in May."]
    lines = []
    for lat in (3, 4):
        for i, t in enumerate(texts):
            ids = tokenizer(t, add_special_tokens=False)["input_ids"][:6]
            toks = [tokenizer.decode([x]) for x in ids]
            acts = [0.0] * len(ids) if i == 2 else [float((j * (lat + i)) % 3) for j in range(len(ids))]
            for split in ("explain", "score"):
                lines.append({"hook": HOOK, "latent": lat, "segment_id": len(lines), "split": split,
                              "kind": "random" if i == 2 else "activating", "level": None, "doc_id": i,
                              "start": 0, "token_ids": ids, "tokens": toks, "acts": acts})
    (seg_dir / "segments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    expls = [{"hook": HOOK, "layer": 1, "latent": 3, "status": "ok", "explanation": "weapons", "error": None},
             {"hook": HOOK, "layer": 1, "latent": 4, "status": "ok", "explanation": "cats", "error": None},
             {"hook": HOOK, "layer": 1, "latent": 8, "status": "failed", "explanation": None,
              "error": "unparsable: empty reply"}]
    rd.interpret.mkdir(parents=True)
    (rd.interpret / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expls))
    return rd


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_stage_on_the_tiny_model(smoke_cfg, tiny_model):
    cfg = _cfg(smoke_cfg, "score.segments_per_call=1")
    rd = _write_run(cfg, tiny_model.tokenizer)
    run_score_stage(cfg, [])
    recs = read_scores(rd.interpret / "scores.jsonl")
    kinds = ("simulation", "detection", "fuzzing")
    assert set(recs) == {(HOOK, lat, k) for lat in (3, 4, 8) for k in kinds}
    for k in kinds:
        r8 = recs[(HOOK, 8, k)]
        assert r8.status == "failed" and r8.failure.startswith("no_explanation")
    for lat in (3, 4):
        r = recs[(HOOK, lat, "simulation")]
        ident = r.details["identity"]
        assert ident["scorer"]["mode"] == "logprobs" and ident["scorer"]["granularity"] == "segment"
        assert ident["scorer"]["llm"] == "tiny"
        assert r.llm_calls == 3 and r.prompt_tokens > 0 and r.details["metrics"]["n_tokens"] > 0
        assert len(r.details["items"]) == 3
        # a real number or a named failure, never a disguised 0/NaN
        if r.status == "ok":
            assert -1.0 <= r.value <= 1.0 and r.failure is None
            assert all(0 <= p <= r.details["metrics"]["scale_max"] for s in r.details["items"] for p in s["pred"])
        else:
            assert r.value is None and r.failure_code in {"constant_prediction", "segments_failed"}
        # the controls: latents 3 and 4 are each other's shuffled partner, the constant one is fixed
        for k in kinds:
            rk = recs[(HOOK, lat, k)]
            shuf = rk.details["controls"]["shuffled"]
            assert shuf["from"] == [HOOK, 7 - lat] and shuf["explanation"] == {3: "cats", 4: "weapons"}[lat]
            assert rk.control_shuffled == shuf["value"]
            assert rk.details["controls"]["constant"]["explanation"] == "ordinary text with nothing in particular"
            assert rk.beats_shuffled == (None if rk.value is None or shuf["value"] is None
                                         else rk.value > shuf["value"])
        for k in ("detection", "fuzzing"):
            rk = recs[(HOOK, lat, k)]
            assert rk.llm_calls == 1  # every item in one batch
            assert all(it["status"] == "ok" and 0.0 <= it["p_yes"] <= 1.0 for it in rk.details["items"])
            if rk.ok:
                assert 0.0 <= rk.value <= 1.0 and rk.details["metrics"]["auroc"] is not None
    summary = RunDir(rd.root).stage_record("score")["summary"]
    assert summary["kinds"]["simulation"]["latents"] == 3
    assert summary["kinds"]["detection"]["failures"].get("no_explanation") == 1

    # Re-running a finished stage does nothing; after a "kill" (stage record and last line lost)
    # it redoes only the lost record, from the response cache: no new rows in the cache.
    n_lines = len(_records(rd.interpret / "scores.jsonl"))
    run_score_stage(cfg, [])
    assert len(_records(rd.interpret / "scores.jsonl")) == n_lines
    db = sqlite3.connect(rd.interpret / "llm_cache.sqlite")
    n_cached = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    (rd.stages / "score.json").unlink()
    lines = (rd.interpret / "scores.jsonl").read_text().splitlines()
    lost = json.loads(lines[-1])
    (rd.interpret / "scores.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # torn line
    run_score_stage(cfg, [])
    redo = _records_tolerant(rd.interpret / "scores.jsonl")[-1]
    assert (redo["latent"], redo["kind"], redo["value"]) == (lost["latent"], lost["kind"], lost["value"])
    if redo["llm_calls"]:
        assert redo["details"]["cached_calls"] == redo["llm_calls"]
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == n_cached


def _records_tolerant(path):
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_json_mode_records_each_failure(smoke_cfg, tiny_model):
    cfg = _cfg(smoke_cfg, "score.mode=json", "score.max_latents=1", "score.json_tokens_per_token=4",
               "score.controls=[]", "score.segments_per_call=1")
    cfg.llm.context_window = 2048  # the JSON prompt is long in the tiny model's small vocabulary
    rd = _write_run(cfg, tiny_model.tokenizer)
    run_score_stage(cfg, [])
    recs = read_scores(rd.interpret / "scores.jsonl")
    r = recs[(HOOK, 3, "simulation")]
    assert r.details["identity"]["scorer"]["mode"] == "json" and r.details["metrics"]["scale_max"] == 10
    assert r.llm_calls == 3 and r.details["controls"] == {}
    # a random-weight model cannot write the JSON: every segment says why, the latent fails honestly
    if r.status == "failed":
        assert r.value is None and r.failure.startswith("segments_failed")
        failed = [s for s in r.details["items"] if s["pred"] is None]
        assert failed and all(s["failure"].split(":")[0] in FAILURE_CODES for s in failed)
    for k in ("detection", "fuzzing"):
        rk = recs[(HOOK, 3, k)]
        assert rk.llm_calls == 1
        if rk.status == "failed":
            assert rk.value is None and rk.failure_code in {"items_failed", "one_class"}
            assert all(it["failure"].split(":")[0] in FAILURE_CODES for it in rk.details["items"] if it["failure"])


def test_bad_settings_are_user_errors(smoke_cfg, tiny_model):
    for bad in ("score.granularity=document", "score.scorers=[simulation,embedding]", "score.controls=[random]",
                "score.segments_per_call=0"):
        cfg = _cfg(smoke_cfg, bad)
        if bad.startswith("score.granularity"):
            _write_run(cfg, tiny_model.tokenizer)
        with pytest.raises(UserError):
            run_score_stage(cfg, [])
    with pytest.raises(UserError):
        run_score_stage(_cfg(smoke_cfg), ["--fast"])
    empty = _cfg(smoke_cfg, "run.name=empty")
    with pytest.raises(UserError, match="safesail explain"):
        run_score_stage(empty, [])


def test_whole_query_windows_come_from_the_corpus(smoke_cfg, tiny_model):
    from safesail.corpus import iter_documents, tokenize_document
    from safesail.interpret.collect import corpus_cfg
    from safesail.interpret.scoring.windows import window_lookup

    cfg = smoke_cfg()
    tok = tiny_model.tokenizer
    docs = iter_documents(corpus_cfg(cfg), tok, cfg.model.get("system_prompt"))
    doc = next(d for d in docs if len(tokenize_document(d, tok)) > 40)
    ids = tokenize_document(doc, tok)
    seg = {"segment_id": 0, "latent": 1, "doc_id": doc.doc_id, "start": 30, "token_ids": ids[30:36]}
    lookup = window_lookup(RunDir.from_cfg(cfg), cfg, HOOK, [seg], max_tokens=32)
    tokens, off = lookup(seg)
    assert len(tokens) == min(32, len(ids))
    assert tokens[off:off + 6] == [tok.decode([i]) for i in ids[30:36]]
    with pytest.raises(UserError, match="collect"):
        lookup({**seg, "token_ids": [ids[31]] * 6})  # not where collect found it
