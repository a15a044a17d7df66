"""Neuron-DB schema v3 benchmark: the costs v3 adds, each against a baseline measured side by side.

    python benchmarks/bench_db_v3.py --latents 20000 --examples 5 --out /tmp/bench_db_v3

On a synthetic run (benchmarks/bench_db.py's generator, plus detection and fuzzing
records for every latent, so three scorer kinds):
- migration of a v2 file of the same content to v3 (what opening an old DB costs once),
  against a full build of that DB from the run's files;
- loading three score kinds (3 rows per latent) against one kind, as an incremental build;
- the integrity check a build and the diagnose server now run first (`PRAGMA quick_check`)
  against SQLite's full `PRAGMA integrity_check` and against a plain open;
- the diagnose lookup of 200 latents (now with every kind's score) against one SQL query per call.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_db import timed, write_run  # noqa: E402

from safesail.config import compose  # noqa: E402
from safesail.interpret.scoring.records import ScoreRecord  # noqa: E402
from safesail.neurondb import NeuronDB, files, schema  # noqa: E402
from safesail.neurondb.build import build_db  # noqa: E402
from safesail.rundir import RunDir  # noqa: E402

V2_COPY = {  # v2 table -> the v3 columns that fill it
    "meta": "key, value", "saes": "*", "inputs": "*", "segments": "*", "tags": "*", "tag_records": "*",
    "latents": "*",
    "explanations": "latent_id, text, status, error, llm, prompt_version, time, raw, prompt_tokens, record_hash",
    "scores": "latent_id, kind, value, status, failure, details, time, record_hash",
}


def make_v2_copy(v3: Path, v2: Path) -> None:
    """A v2-schema file holding the v3 DB's content (simulation scores only, as v2 had)."""
    v2.unlink(missing_ok=True)
    conn = sqlite3.connect(v2, isolation_level=None)
    schema.create_version(conn, 2)
    conn.execute("ATTACH DATABASE ? AS n", (str(v3),))
    conn.execute("BEGIN")
    for table, cols in V2_COPY.items():
        where = " WHERE kind = 'simulation'" if table == "scores" else ""
        conn.execute(f"INSERT INTO main.{table} SELECT {cols} FROM n.{table}{where}")
    conn.execute("COMMIT")
    conn.execute("DETACH DATABASE n")
    conn.close()


def add_kinds(root: Path) -> int:
    """Append detection and fuzzing records for every latent with a simulation record."""
    path = root / "interpret" / "scores.jsonl"
    rng = random.Random(0)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    with open(path, "a") as f:
        for r in recs:
            for kind in ("detection", "fuzzing"):
                v = rng.uniform(0.3, 1.0)
                f.write(json.dumps(ScoreRecord(hook=r["hook"], layer=r["layer"], latent=r["latent"], kind=kind,
                                               value=v, ci_low=v - 0.1, ci_high=v + 0.1, control_shuffled=0.5,
                                               control_constant=0.5, beats_shuffled=v > 0.5, n_examples=12,
                                               llm_calls=2, prompt_tokens=1500, completion_tokens=30,
                                               details={"balanced_accuracy": v}).to_json()) + "\n")
    return 2 * len(recs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=20_000)
    ap.add_argument("--hooks", type=int, default=5)
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_db_v3"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(a.out, ignore_errors=True)
    cfg = compose(["experiment=smoke", f"run.root={a.out}", "run.name=bench"])
    rd = RunDir.from_cfg(cfg)
    write_run(rd.root, a.latents, a.hooks, a.examples, 16, 50, 32)
    res: dict[str, float] = {}

    t0, c0 = time.perf_counter(), time.process_time()
    build_db(cfg, rd)
    res["full_build_1kind_s"], res["full_build_1kind_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    n_rows = add_kinds(rd.root)
    t0, c0 = time.perf_counter(), time.process_time()
    s = build_db(cfg, rd)
    res["add_2kinds_build_s"], res["add_2kinds_build_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    assert s["scores"] == n_rows, s  # only the new rows are written
    res["db_mib"] = rd.neuron_db.stat().st_size / 2**20

    full3 = a.out / "full3.sqlite"
    t0, c0 = time.perf_counter(), time.process_time()
    build_db(cfg, rd, full3)
    res["full_build_3kinds_s"], res["full_build_3kinds_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0

    v2 = a.out / "v2.sqlite"
    make_v2_copy(rd.neuron_db, v2)
    t0, c0 = time.perf_counter(), time.process_time()
    NeuronDB.open(v2).close()
    res["migrate_v2_to_v3_s"], res["migrate_v2_to_v3_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0

    for name, fn in (("quick_check", lambda: files.integrity_problem(rd.neuron_db)),
                     ("integrity_check", lambda: sqlite3.connect(rd.neuron_db).execute("PRAGMA integrity_check").fetchall()),
                     ("plain_open", lambda: NeuronDB.open(rd.neuron_db).close())):
        fn()  # page cache warm for all three
        res[f"{name}_ms"] = statistics.median(timed(fn, 5))

    hook = "layers.4.mlp_out"
    db = NeuronDB.open(rd.neuron_db)
    ids_all = db.normalizers(hook)[0].tolist()
    rng = random.Random(0)
    queries = [rng.sample(ids_all, 180) + rng.sample(range(4 * len(ids_all)), 20) for _ in range(a.reps)]
    t0 = time.perf_counter()
    first = db.lookup(hook, queries[0])
    res["lookup_cold_ms"] = (time.perf_counter() - t0) * 1000
    assert first == db.lookup_uncached(hook, queries[0])
    assert all(len(r["scores"]) == 3 for r in first.values())
    for q in queries[:20]:
        db.lookup(hook, q), db.lookup_uncached(hook, q)
    for name, fn in (("cached", db.lookup), ("one_query", db.lookup_uncached)):
        it = iter(queries)
        ts = sorted(timed(lambda: fn(hook, next(it)), a.reps))
        res[f"lookup_{name}_median_ms"] = statistics.median(ts)
        res[f"lookup_{name}_p95_ms"] = ts[int(0.95 * len(ts))]
    db.close()

    print(f"{a.latents} latents, 3 scorer kinds, DB {res['db_mib']:.0f} MiB")
    print(f"full build: {res['full_build_1kind_s']:.1f} s with 1 kind, {res['full_build_3kinds_s']:.1f} s with 3 "
          f"(ratio {res['full_build_3kinds_s'] / res['full_build_1kind_s']:.2f}); adding 2 kinds incrementally: "
          f"{res['add_2kinds_build_s']:.1f} s; CPU time {res['full_build_1kind_cpu_s']:.1f} / "
          f"{res['full_build_3kinds_cpu_s']:.1f} / {res['add_2kinds_build_cpu_s']:.1f} s")
    print(f"v2 -> v3 migration on open: {res['migrate_v2_to_v3_s']:.2f} s = "
          f"{res['migrate_v2_to_v3_s'] / res['full_build_1kind_s']:.3f} of a full rebuild")
    print(f"integrity: quick_check {res['quick_check_ms']:.0f} ms, integrity_check {res['integrity_check_ms']:.0f} ms "
          f"(ratio {res['quick_check_ms'] / res['integrity_check_ms']:.2f}), plain open {res['plain_open_ms']:.1f} ms")
    print(f"lookup of 200 (median / p95 ms): cached {res['lookup_cached_median_ms']:.3f} / "
          f"{res['lookup_cached_p95_ms']:.3f} (first call {res['lookup_cold_ms']:.1f}); one SQL query "
          f"{res['lookup_one_query_median_ms']:.2f} / {res['lookup_one_query_p95_ms']:.2f}")
    print(json.dumps({k: round(v, 3) for k, v in res.items()}))


if __name__ == "__main__":
    sys.exit(main())
