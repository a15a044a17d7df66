"""`safesail db build`: build, incremental update, SAE regeneration, concurrent reads, killed builds."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from neurondb_helpers import append_jsonl, interpret_records, make_run, write_latents, write_sae
from safesail.errors import UserError
from safesail.neurondb import NeuronDB
from safesail.neurondb.build import build_db
from safesail.neurondb.cli import run_db_command
from safesail.rundir import RunDir

H1, H3 = "layers.1.mlp_out", "layers.3.mlp_out"


@pytest.fixture
def run(smoke_cfg):
    cfg = smoke_cfg()
    rd = RunDir.from_cfg(cfg)
    data = make_run(rd.root)
    return cfg, rd, data


def test_build_holds_every_input(run):
    cfg, rd, data = run
    s = build_db(cfg, rd)
    assert s["latents"] == 24 and s["explanations"] == 24 and s["scores"] == 24 and s["tags"] == 24
    assert s["segments"] == 72
    with NeuronDB.open(rd.neuron_db) as db:
        assert db.model_info()["model"] == "tiny" and db.model_info()["source"] == "safesail-run"
        saes = db.saes()
        assert [(x["hook"], x["layer"], x["arch"], x["k"], x["width"], x["d_in"], x["layout"]) for x in saes] == [
            (H1, 1, "topk", 4, 64, 16, "safesail"), (H3, 3, "topk", 4, 64, 16, "safesail")]
        assert saes[0]["path"] == f"saes/{H1}/topk-k4"  # relative to the run dir (= the DB's folder)
        ids, q = db.normalizers(H1)
        stats = data[H1]["stats"]
        assert ids.tolist() == stats["latent_ids"].tolist()
        assert torch.equal(q, stats["quantile_999"])
        got = db.lookup(H1, [8, 13, 999])
        assert set(got) == {8, 13}
        assert got[13] == {"hook": H1, "layer": 1, "index": 13, "explanation": "violence related words, latent 13 (v1)",
                           "score": pytest.approx(0.1 + 0.8 * 2 / 11, abs=1e-4),
                           "scores": {"simulation": pytest.approx(0.1 + 0.8 * 2 / 11, abs=1e-4)}, "tags": ["violence"]}
        rec = db.latent(H1, 8)
        row = data[H1]["ids"].index(8)
        assert rec["density"] == pytest.approx(float(stats["density"][row]))
        assert rec["top_acts"] == pytest.approx(stats["top_acts"][row].tolist())
        assert rec["histogram"]["counts"] == stats["hist_counts"][row].tolist()
        assert len(rec["histogram"]["edges"]) == 7
        assert [e["segment_id"] for e in rec["examples"]] == ["8-0", "8-1", "8-2"]
        assert rec["examples"][0]["tokens"] == ["t8", "_a", "_b", "_0"]
        assert rec["score_details"]["llm_calls"] == 4 and rec["scores"]["simulation"]["llm_calls"] == 4
        assert rec["tag_details"]["evidence"] == {"pornography": {"share": 0.7}}
        hits = db.search("violence", domain="violence", min_score=0.3)
        assert hits and all("violence" in h["tags"] and h["score"] >= 0.3 for h in hits)
        assert {(h["layer"], h["index"]) for h in hits} == {(1, 53), (3, 53)}
        assert db.search(layer=3, max_score=0.15) == [
            {"hook": H3, "layer": 3, "index": 3, "explanation": "punctuation related words, latent 3 (v1)",
             "score": 0.1, "kind": "simulation", "tags": []}]
        st = db.stats()
        assert st["totals"] == {"latents": 24, "explained": 24, "tagged": 16}
        assert st["per_domain"] == {"politics": 4, "pornography": 4, "terror": 4, "violence": 4, "general": 8}
        assert sum(st["per_score_band"].values()) == 24


def test_rebuild_updates_only_what_changed(run):
    cfg, rd, data = run
    build_db(cfg, rd)
    again = build_db(cfg, rd)
    assert again == {"set_aside": None, "hooks_replaced": [], "hooks_removed": [], "hooks_stats_reloaded": [],
                     "latents": 0, "segments": 0, "explanations": 0, "scores": 0, "tags": 0, "verify_effects": 0}
    # A newer explanation and score for one latent are appended (the last record wins).
    expl, scores, _ = interpret_records(H3, [18], version="v2")
    scores[0]["score"] = 0.91
    append_jsonl(rd.interpret / "explanations.jsonl", expl)
    append_jsonl(rd.interpret / "scores.jsonl", scores)
    s = build_db(cfg, rd)
    assert (s["explanations"], s["scores"], s["tags"], s["latents"], s["segments"]) == (1, 1, 0, 0, 0)
    with NeuronDB.open(rd.neuron_db) as db:
        assert db.lookup(H3, [18])[18]["explanation"].endswith("(v2)")
        assert db.lookup(H3, [18])[18]["score"] == 0.91
        assert db.lookup(H1, [18])[18]["explanation"].endswith("(v1)")
        assert [h["index"] for h in db.search("v2")] == [18]


def test_new_sae_replaces_the_hook_in_one_step(run):
    cfg, rd, data = run
    build_db(cfg, rd)
    rel = write_sae(rd.root, H1, "topk-k8", 32, k=8, seed=5)
    write_latents(rd.root, H1, rel, [0, 1, 2], k=8, seed=5)
    sel = json.loads(rd.selection_file.read_text())
    sel["chosen"][H1] = {"sae": "topk-k8", "dir": rel}
    rd.selection_file.write_text(json.dumps(sel))
    expl, scores, tags = interpret_records(H1, [0, 1, 2], version="new-sae")
    append_jsonl(rd.interpret / "explanations.jsonl", expl)
    s = build_db(cfg, rd)
    assert s["hooks_replaced"] == [H1]
    with NeuronDB.open(rd.neuron_db) as db:
        sae = [x for x in db.saes() if x["hook"] == H1][0]
        assert (sae["k"], sae["width"]) == (8, 32)
        assert db.normalizers(H1)[0].tolist() == [0, 1, 2]
        # The old SAE's rows went with it; its JSONL records (latents 3, 8, ...) are not re-attached.
        assert db.lookup(H1, [0])[0]["explanation"].endswith("(new-sae)")
        assert set(db.lookup(H1, range(64))) == {0, 1, 2}
        assert len(db.lookup(H3, data[H3]["ids"])) == 12


def test_hook_dropped_from_the_run_is_removed(run):
    cfg, rd, data = run
    build_db(cfg, rd)
    shutil.rmtree(rd.root / "latents" / H3)
    sel = json.loads(rd.selection_file.read_text())
    del sel["chosen"][H3]
    rd.selection_file.write_text(json.dumps(sel))
    s = build_db(cfg, rd)
    assert s["hooks_removed"] == [H3] and s["explanations"] == 0
    with NeuronDB.open(rd.neuron_db) as db:
        assert [x["hook"] for x in db.saes()] == [H1]
        assert db.lookup(H3, data[H3]["ids"]) == {}
        assert db.stats()["totals"]["latents"] == 12
        assert db.conn.execute("SELECT count(*) FROM segments").fetchone()[0] == 36


def test_reader_sees_old_db_until_rebuild_commits(run):
    cfg, rd, data = run
    build_db(cfg, rd)
    expl, _, _ = interpret_records(H1, data[H1]["ids"], version="v2")
    append_jsonl(rd.interpret / "explanations.jsonl", expl)
    reader = NeuronDB.open(rd.neuron_db)
    midway, release = threading.Event(), threading.Event()

    def pause(hook):
        midway.set()
        assert release.wait(30)

    t = threading.Thread(target=build_db, args=(cfg, rd), kwargs={"on_hook_done": pause})
    t.start()
    try:
        assert midway.wait(30)
        seen = reader.lookup(H1, data[H1]["ids"])
        assert len(seen) == 12 and all(v["explanation"].endswith("(v1)") for v in seen.values())
        assert reader.stats()["totals"]["explained"] == 24
    finally:
        release.set()
        t.join(60)
    seen = reader.lookup(H1, data[H1]["ids"])
    assert all(v["explanation"].endswith("(v2)") for v in seen.values())
    reader.close()


def test_killed_build_leaves_previous_db_usable(run, tmp_path):
    cfg, rd, data = run
    build_db(cfg, rd)
    expl, _, _ = interpret_records(H1, data[H1]["ids"], version="v2")
    append_jsonl(rd.interpret / "explanations.jsonl", expl)
    write_latents(rd.root, H3, f"saes/{H3}/topk-k4", [1, 2], seed=9)
    script = textwrap.dedent(f"""
        import os, signal
        from safesail.config import compose
        from safesail.rundir import RunDir
        from safesail.neurondb.build import build_db
        cfg = compose({[f"run.root={rd.root.parent}", "experiment=smoke"]!r})
        build_db(cfg, RunDir.from_cfg(cfg), on_hook_done=lambda h: os.kill(os.getpid(), signal.SIGKILL))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with NeuronDB.open(rd.neuron_db) as db:
        seen = db.lookup(H1, data[H1]["ids"])
        assert len(seen) == 12 and all(v["explanation"].endswith("(v1)") for v in seen.values())
        assert db.normalizers(H3)[0].tolist() == data[H3]["ids"]
    s = build_db(cfg, rd)  # the next build completes the work
    assert s["explanations"] == 12 and H3 in s["hooks_stats_reloaded"]


def test_inputs_of_another_model_are_refused(run):
    cfg, rd, data = run
    build_db(cfg, rd)
    before = hashlib.sha256(rd.neuron_db.read_bytes()).hexdigest()
    meta = rd.root / "latents" / H1 / "meta.json"
    m = json.loads(meta.read_text())
    m["model"] = "qwen2.5-3b-instruct"
    meta.write_text(json.dumps(m))
    with pytest.raises(UserError, match="collected on model 'qwen2.5-3b-instruct'"):
        build_db(cfg, rd)
    assert hashlib.sha256(rd.neuron_db.read_bytes()).hexdigest() == before


def test_build_refuses_a_foreign_db_file(run):
    cfg, rd, _ = run
    rd.neuron_db.write_text("not a db")
    with pytest.raises(UserError, match="not an SQLite file"):
        build_db(cfg, rd)
    assert rd.neuron_db.read_text() == "not a db"


def test_cli_build_stats_search_show_export(run, capsys):
    cfg, rd, _ = run
    run_db_command(cfg, ["build"])
    assert rd.stage_done("db", rd.stage_record("db")["fingerprint"])
    mtime = rd.neuron_db.stat().st_mtime_ns
    run_db_command(cfg, ["build"])  # finished stage: nothing to do
    assert rd.neuron_db.stat().st_mtime_ns == mtime
    capsys.readouterr()
    run_db_command(cfg, ["stats"])
    out = capsys.readouterr().out
    assert "24 latents, 24 explained, 16 tagged" in out and "violence 4" in out
    run_db_command(cfg, ["search", "violence", "--domain", "violence", "--min-score", "0.3"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith(("1_53", "3_53")) for line in out)
    run_db_command(cfg, ["show", "1", "13"])
    out = capsys.readouterr().out
    assert "violence related words, latent 13" in out and "#0 top explain" in out
    run_db_command(cfg, ["export"])
    assert "exported 20 entries" in capsys.readouterr().out
    exported = json.loads((rd.export / "en_db.json").read_text())
    assert len(exported) == 20 and min(e["correlation_score"] for e in exported.values()) >= 0.2
    with pytest.raises(UserError, match="not in the neuron database"):
        run_db_command(cfg, ["show", "1", "14"])
    with pytest.raises(UserError, match="no SAE on layer 7"):
        run_db_command(cfg, ["show", "7", "1"])
    with pytest.raises(UserError, match="invalid choice"):
        run_db_command(cfg, ["frobnicate"])
