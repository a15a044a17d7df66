"""Neuron-DB benchmark: build time and file size for a synthetic run, and the per-token lookup latency.

    python benchmarks/bench_db.py --latents 50000 --examples 20 --out /tmp/bench_db

Writes a synthetic run directory (latents split over --hooks hook points, each with
stats, --examples segments of --seg-tokens tokens, an explanation, a score and tags),
then measures:
- full build time and the DB file size;
- an incremental rebuild after 100 new explanations are appended (vs the full build);
- lookup of 200 latents of one hook (the diagnose stage's per-token hot path):
  `NeuronDB.lookup` (one query) against a baseline of one query per latent.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from safesail.config import compose
from safesail.neurondb import NeuronDB
from safesail.neurondb.build import build_db
from safesail.rundir import RunDir

DOMAINS = ("politics", "pornography", "violence", "terror")
WORDS = ("knife", "attack", "vote", "party", "bomb", "explicit", "number", "comma", "city", "code", "poem", "rifle")


def write_run(root: Path, n_latents: int, hooks: int, examples: int, seg_tokens: int, k: int, bins: int) -> None:
    rng = np.random.default_rng(0)
    per_hook = n_latents // hooks
    sel = {"version": 1, "chosen": {}}
    interp = root / "interpret"
    interp.mkdir(parents=True, exist_ok=True)
    fe, fs, ft = (open(interp / f"{n}.jsonl", "w") for n in ("explanations", "scores", "tags"))
    for h in range(hooks):
        hook = f"layers.{4 * h}.mlp_out"
        rel = f"saes/{hook}/topk-k32"
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "cfg.json").write_text(json.dumps({"arch": "topk", "d_in": 576, "n_latents": 4 * per_hook,
                                                         "k": 32, "hook": hook, "model": "tiny"}))
        (root / rel / "sae.safetensors").write_bytes(b"weights-" + str(h).encode())
        sel["chosen"][hook] = {"sae": "topk-k32", "dir": rel}
        ids = np.sort(rng.choice(4 * per_hook, per_hook, replace=False))
        top = -np.sort(-rng.gamma(2, 1, (per_hook, k)), axis=1).astype(np.float32)
        d = root / "latents" / hook
        d.mkdir(parents=True, exist_ok=True)
        save_file({"latent_ids": torch.from_numpy(ids.astype(np.int64)),
                   "density": torch.from_numpy(rng.uniform(0, 0.05, per_hook).astype(np.float32)),
                   "top_acts": torch.from_numpy(top),
                   "bottom_acts": torch.from_numpy(np.sort(rng.uniform(0, 0.01, (per_hook, k)), axis=1).astype(np.float32)),
                   "quantile_999": torch.from_numpy(top[:, k // 4].copy()), "max_act": torch.from_numpy(top[:, 0].copy()),
                   "hist_counts": torch.from_numpy(rng.integers(0, 1000, (per_hook, bins)).astype(np.float32)),
                   "hist_edges": torch.from_numpy(np.tile(np.linspace(0, 8, bins + 1, dtype=np.float32), (per_hook, 1)))},
                  str(d / "stats.safetensors"))
        (d / "meta.json").write_text(json.dumps({"hook": hook, "layer": 4 * h, "sae": rel, "model": "tiny",
                                                 "num_tokens": 1_000_000}))
        with open(d / "segments.jsonl", "w") as f:
            for lat in ids.tolist():
                for j in range(examples):
                    tok_ids = rng.integers(0, 49152, seg_tokens).tolist()
                    f.write(json.dumps({"hook": hook, "latent": lat, "segment_id": f"{lat}-{j}", "split": "explain",
                                        "kind": "top" if j < examples * 3 // 4 else "random", "level": j % 5,
                                        "doc_id": int(rng.integers(0, 10_000)), "start": int(rng.integers(0, 2000)),
                                        "token_ids": tok_ids, "tokens": [f"tok{t}" for t in tok_ids],
                                        "acts": np.round(rng.uniform(0, 3, seg_tokens), 3).tolist()}) + "\n")
        for i, lat in enumerate(ids.tolist()):
            dom = [DOMAINS[i % 4]] if i % 3 == 0 else []
            text = " ".join(random.Random(lat).choices(WORDS, k=8))
            fe.write(json.dumps({"hook": hook, "layer": 4 * h, "latent": lat, "status": "ok", "explanation": text,
                                 "error": None, "model": "explainer", "prompt_version": "v1", "raw": text,
                                 "prompt_tokens": 800, "time": "2026-01-01T00:00:00"}) + "\n")
            fs.write(json.dumps({"hook": hook, "layer": 4 * h, "latent": lat, "status": "ok",
                                 "score": float(rng.uniform(-0.1, 0.8)), "failure": None, "kind": "correlation",
                                 "mode": "segment", "granularity": "segment", "simulator": "sim", "prompt_version": "v1",
                                 "n_tokens": 320, "llm_calls": 20, "prompt_tokens": 9000, "seconds": 3.0,
                                 "segments": [], "time": "2026-01-01T00:00:01"}) + "\n")
            ft.write(json.dumps({"hook": hook, "layer": 4 * h, "latent": lat, "tags": dom,
                                 "evidence": {d_: {"share": 0.6} for d_ in dom}, "thresholds": {"share": 0.5},
                                 "time": "2026-01-01T00:00:02"}) + "\n")
    for f in (fe, fs, ft):
        f.close()
    (root / "selection.json").write_text(json.dumps(sel))


NAIVE_SQL = ("SELECT l.layer, e.text, s.value FROM latents l LEFT JOIN explanations e ON e.latent_id = l.id "
             "LEFT JOIN scores s ON s.latent_id = l.id AND s.kind = 'simulation' WHERE l.hook = ? AND l.idx = ?")


def naive_lookup(db: NeuronDB, hook: str, ids) -> dict:
    """Baseline: one query per latent (plus one for its tags), as a straightforward port would do."""
    out = {}
    for i in ids:
        row = db.conn.execute(NAIVE_SQL, (hook, int(i))).fetchone()
        if row is None:
            continue
        tags = [r[0] for r in db.conn.execute(
            "SELECT domain FROM tags t JOIN latents l ON l.id = t.latent_id WHERE l.hook = ? AND l.idx = ? "
            "ORDER BY position", (hook, int(i)))]
        kinds = {k: v for k, v in db.conn.execute(
            "SELECT s.kind, s.value FROM scores s JOIN latents l ON l.id = s.latent_id WHERE l.hook = ? AND l.idx = ? "
            "AND s.value IS NOT NULL ORDER BY s.kind", (hook, int(i)))}
        out[int(i)] = {"hook": hook, "layer": row[0], "index": int(i), "explanation": row[1], "score": row[2],
                       "scores": kinds, "tags": tags}
    return out


def timed(fn, reps: int) -> list[float]:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=50_000)
    ap.add_argument("--hooks", type=int, default=5)
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--seg-tokens", type=int, default=16)
    ap.add_argument("--k", type=int, default=50, help="top/bottom activations kept per latent")
    ap.add_argument("--bins", type=int, default=32)
    ap.add_argument("--lookup", type=int, default=200)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_db"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(a.out, ignore_errors=True)
    cfg = compose(["experiment=smoke", f"run.root={a.out}", "run.name=bench"])
    rd = RunDir.from_cfg(cfg)
    t0 = time.perf_counter()
    write_run(rd.root, a.latents, a.hooks, a.examples, a.seg_tokens, a.k, a.bins)
    print(f"synthetic run written in {time.perf_counter() - t0:.1f} s "
          f"(segments.jsonl total {sum(p.stat().st_size for p in rd.root.glob('latents/*/segments.jsonl')) / 2**20:.0f} MiB)")

    t0 = time.perf_counter()
    s = build_db(cfg, rd)
    full = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in rd.root.glob("neurons.sqlite*"))
    print(f"full build: {full:.1f} s for {s['latents']} latents, {s['segments']} segments; "
          f"DB size {size / 2**20:.0f} MiB")

    t0 = time.perf_counter()
    s = build_db(cfg, rd)
    noop = time.perf_counter() - t0
    hook = "layers.4.mlp_out"
    with NeuronDB.open(rd.neuron_db) as db:
        some = db.normalizers(hook)[0][:100].tolist()
    with open(rd.interpret / "explanations.jsonl", "a") as f:
        for lat in some:
            f.write(json.dumps({"hook": hook, "layer": 4, "latent": lat, "status": "ok", "explanation": "updated text",
                                "model": "explainer", "prompt_version": "v2", "time": "2026-01-02"}) + "\n")
    t0 = time.perf_counter()
    s = build_db(cfg, rd)
    incr = time.perf_counter() - t0
    print(f"rebuild, nothing changed: {noop:.2f} s; after 100 new explanations: {incr:.2f} s "
          f"({s['explanations']} rows rewritten) = {full / incr:.0f}x faster than the full build")

    db = NeuronDB.open(rd.neuron_db)
    ids_all = db.normalizers(hook)[0].tolist()
    rng = random.Random(0)
    # a token's firing latents: mostly ones the DB holds, some it does not (unexplained)
    queries = [rng.sample(ids_all, a.lookup * 9 // 10) + rng.sample(range(4 * len(ids_all)), a.lookup // 10)
               for _ in range(a.reps)]
    t0 = time.perf_counter()
    first = db.lookup(hook, queries[0])  # loads the hook's rows into the cache
    cold = (time.perf_counter() - t0) * 1000
    assert first == naive_lookup(db, hook, queries[0]) == db.lookup_uncached(hook, queries[0])
    for q in queries[:20]:  # warm the page cache and statement caches for all three
        db.lookup(hook, q), db.lookup_uncached(hook, q), naive_lookup(db, hook, q)
    res = {}
    for name, fn in (("cached", db.lookup), ("one_query", db.lookup_uncached), ("naive", lambda h, q: naive_lookup(db, h, q))):
        it = iter(queries)
        ts = sorted(timed(lambda: fn(hook, next(it)), a.reps))
        res[name] = (statistics.median(ts), ts[int(0.95 * len(ts))])
    print(f"lookup of {a.lookup} latents (median / p95 ms): NeuronDB.lookup {res['cached'][0]:.3f} / {res['cached'][1]:.3f} "
          f"(first call, loading the hook: {cold:.1f}); one SQL query per call {res['one_query'][0]:.2f} / "
          f"{res['one_query'][1]:.2f}; naive per-latent queries {res['naive'][0]:.2f} / {res['naive'][1]:.2f}; "
          f"ratio naive/lookup {res['naive'][0] / res['cached'][0]:.0f}x")
    db.close()
    print(json.dumps({"full_build_s": round(full, 1), "db_mib": round(size / 2**20), "noop_rebuild_s": round(noop, 2),
                      "incremental_rebuild_s": round(incr, 2), "lookup_cold_ms": round(cold, 1),
                      **{f"lookup_{k}_ms": [round(v[0], 3), round(v[1], 3)] for k, v in res.items()}}))


if __name__ == "__main__":
    sys.exit(main())
