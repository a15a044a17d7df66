"""Schema v3: a real v2 file migrates; scores of every kind with their controls, and causal checks, from the
scoring and verify stages' own record files into the DB, `db search --kind`, `db show`, export/verify.jsonl."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from neurondb_helpers import append_jsonl, make_run
from safesail.errors import UserError
from safesail.interpret.scoring.records import ScoreRecord
from safesail.neurondb import NeuronDB, schema
from safesail.neurondb.build import build_db
from safesail.neurondb.cli import run_db_command
from safesail.rundir import RunDir
from safesail.verify.records import Effect, EffectWriter, effects_path

V2 = Path(__file__).resolve().parents[1] / "data" / "neurondb" / "v2_smoke.sqlite"
H1, H3 = "layers.1.mlp_out", "layers.3.mlp_out"


def test_real_v2_file_migrates(tmp_path):
    path = tmp_path / "v2.sqlite"
    shutil.copy(V2, path)
    raw = sqlite3.connect(path)
    assert schema.user_version(raw) == 2
    before = raw.execute("SELECT l.hook, l.idx, s.value, e.text FROM latents l JOIN scores s ON s.latent_id = l.id "
                         "JOIN explanations e ON e.latent_id = l.id ORDER BY l.id").fetchall()
    v2_details = json.loads(raw.execute("SELECT details FROM scores ORDER BY latent_id LIMIT 1").fetchone()[0])
    raw.close()
    assert len(before) == 28

    with NeuronDB.open(path) as db:
        assert db.model_info()["schema_version"] == 3
        rows = db.conn.execute("SELECT kind, count(*) FROM scores GROUP BY kind").fetchall()
        assert rows == [("simulation", 28)]
        hook, idx, value, text = before[0]
        rec = db.latent(hook, idx)
        sim = rec["scores"]["simulation"]
        assert rec["score"] == value == sim["value"]
        # the cost and example counts that v2 kept inside details now have columns
        assert (sim["llm_calls"], sim["prompt_tokens"], sim["completion_tokens"]) == (
            v2_details["llm_calls"], v2_details["prompt_tokens"], v2_details["completion_tokens"])
        assert sim["n_examples"] == len(v2_details["segments"])
        assert rec["explanations"] == {"en": text}
        assert rec["verify_effects"] == []
        got = db.lookup(hook, [idx])[idx]
        assert got["score"] == value and got["scores"] == {"simulation": value}
        word = next(w for w in text.split() if w.isalpha() and w.isascii())
        assert (hook, idx) in {(h["hook"], h["index"]) for h in db.search(word, limit=100)}
        assert [h["kind"] for h in db.search(kind="simulation", limit=3)] == ["simulation"] * 3
        no_detection = db.search(kind="detection", limit=100)
        assert len(no_detection) == 28 and all(h["score"] is None for h in no_detection)
        assert db.search(kind="detection", min_score=-1.0) == []


def _score(hook, latent, kind, value, shuffled, **kw) -> dict:
    return ScoreRecord(hook=hook, layer=int(hook.split(".")[1]), latent=latent, kind=kind, value=value,
                       ci_low=value - 0.1, ci_high=value + 0.1, control_shuffled=shuffled, control_constant=0.5,
                       beats_shuffled=value > shuffled, n_examples=12, llm_calls=3, prompt_tokens=900,
                       completion_tokens=40, details={"balanced_accuracy": value}, **kw).to_json()


@pytest.fixture
def v3_run(smoke_cfg):
    cfg = smoke_cfg()
    rd = RunDir.from_cfg(cfg)
    data = make_run(rd.root)  # v2-style simulation records (key "score") for every latent
    ids = data[H1]["ids"]
    append_jsonl(rd.interpret / "scores.jsonl",
                 [_score(H1, ids[0], "detection", 0.82, 0.51), _score(H1, ids[0], "fuzzing", 0.64, 0.70),
                  _score(H1, ids[1], "detection", 0.40, 0.45)])
    with EffectWriter(effects_path(rd.root)) as w:
        w.write([Effect(hook=H1, layer=1, latent=ids[0], target="latent", check="necessity", metric="delta_loss",
                        value=0.31, ci_low=0.2, ci_high=0.4, n=16, domain="violence", lang="en",
                        details={"segments": 16}),
                 Effect(hook=H1, layer=1, latent=ids[0], target="random_latent", check="sufficiency",
                        metric="on_concept_rate", value=0.1, n=8),
                 Effect(hook=H1, layer=1, latent=None, target="diff_in_means", check="refusal",
                        metric="refusal_delta", value=-0.2, ci_low=-0.3, ci_high=-0.1, n=20, domain="violence")])
    return cfg, rd, ids


def test_every_kind_and_the_causal_checks_reach_the_db(v3_run, capsys, tmp_path):
    cfg, rd, ids = v3_run
    s = build_db(cfg, rd)
    assert s["scores"] == 24 + 3 and s["verify_effects"] == 3
    with NeuronDB.open(rd.neuron_db) as db:
        rec = db.latent(H1, ids[0])
        assert list(rec["scores"]) == ["simulation", "detection", "fuzzing"]
        det = rec["scores"]["detection"]
        assert (det["value"], det["ci_low"], det["ci_high"], det["control_shuffled"], det["control_constant"],
                det["beats_shuffled"], det["n_examples"], det["llm_calls"], det["prompt_tokens"],
                det["completion_tokens"], det["status"]) == (0.82, pytest.approx(0.72), pytest.approx(0.92), 0.51,
                                                              0.5, True, 12, 3, 900, 40, "ok")
        assert det["details"] == {"balanced_accuracy": 0.82}
        assert rec["scores"]["fuzzing"]["beats_shuffled"] is False
        assert rec["score"] == rec["scores"]["simulation"]["value"]  # correlation_score stays the simulation's
        assert [(e["check"], e["target"], e["value"]) for e in rec["verify_effects"]] == [
            ("necessity", "latent", 0.31), ("sufficiency", "random_latent", 0.1)]
        assert rec["verify_effects"][0]["details"] == {"segments": 16} and rec["verify_effects"][0]["lang"] == "en"
        assert db.lookup(H1, [ids[0]])[ids[0]]["scores"]["detection"] == 0.82
        hits = db.search(min_score=0.6, kind="detection")
        assert [(h["index"], h["score"], h["kind"]) for h in hits] == [(ids[0], 0.82, "detection")]
        assert [h["index"] for h in db.search(max_score=0.5, kind="detection")] == [ids[1]]
        st = db.stats()
        assert st["per_kind"]["detection"] == {"scored": 2, "mean": pytest.approx(0.61), "beats_shuffled": 1}
        assert st["verify_effects"] == 3
    # a rebuild with nothing changed writes nothing; a changed effects file replaces the table
    again = build_db(cfg, rd)
    assert again["scores"] == 0 and again["verify_effects"] == 0
    with EffectWriter(effects_path(rd.root)) as w:
        w.write([Effect(hook=H1, layer=1, latent=ids[0], target="latent", check="necessity", metric="delta_loss",
                        value=0.35, n=16, domain="violence", lang="en")])
    assert build_db(cfg, rd)["verify_effects"] == 3
    with NeuronDB.open(rd.neuron_db) as db:
        assert db.latent(H1, ids[0])["verify_effects"][0]["value"] == 0.35

    run_db_command(cfg, ["search", "--kind", "detection", "--min-score", "0.6"])
    out = capsys.readouterr().out
    assert f"1_{ids[0]}" in out and "0.820" in out and f"1_{ids[1]} " not in out
    with pytest.raises(UserError, match="no 'intruder' scores; --kind takes one of detection, fuzzing, simulation"):
        run_db_command(cfg, ["search", "--kind", "intruder"])
    run_db_command(cfg, ["show", "1", str(ids[0])])
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.split()}
    assert "shuffled" in lines["scorer"] and "constant" in lines["scorer"]
    assert lines["detection"].split()[:6] == ["detection", "0.820", "[0.720,", "0.920]", "0.510", "0.500"]
    assert "yes" in lines["detection"] and " no " in lines["fuzzing"]
    assert "necessity" in out and "delta_loss (violence, en): 0.350" in out and "vs random_latent" in out

    out_dir = tmp_path / "export"
    run_db_command(cfg, ["export", "--out", str(out_dir)])
    effects = [json.loads(x) for x in (out_dir / "verify.jsonl").read_text().splitlines()]
    assert len(effects) == 3
    assert {(e["latent"], e["target"], e["check"]) for e in effects} == {
        (ids[0], "latent", "necessity"), (ids[0], "random_latent", "sufficiency"), (None, "diff_in_means", "refusal")}
    assert set(effects[0]) == {"hook", "layer", "latent", "target", "domain", "lang", "check", "metric", "value",
                               "ci_low", "ci_high", "n", "details"}
    en = json.loads((out_dir / "en_db.json").read_text())
    with NeuronDB.open(rd.neuron_db) as db:
        for key, entry in en.items():
            layer, idx = map(int, key.split("_"))
            hook = H1 if layer == 1 else H3
            assert entry["correlation_score"] == db.latent(hook, idx)["scores"]["simulation"]["value"]
