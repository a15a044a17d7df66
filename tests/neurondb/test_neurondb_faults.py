"""Issue 16, items 1 and 2: a first build killed at any moment can be finished; a corrupt DB is noticed
(at build start and when the diagnose server opens it), set aside and rebuilt from the run's files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from neurondb_helpers import make_run
from safesail.errors import UserError
from safesail.neurondb import NeuronDB
from safesail.neurondb.build import build_db
from safesail.neurondb.cli import run_db_command
from safesail.rundir import RunDir


@pytest.fixture
def run(smoke_cfg):
    cfg = smoke_cfg()
    rd = RunDir.from_cfg(cfg)
    make_run(rd.root)
    return cfg, rd


def test_schemaless_file_left_by_a_killed_first_build_is_replaced(run):
    cfg, rd = run
    # the state a SIGKILL 0-60 ms into the first build left behind (issue 16, item 1)
    sqlite3.connect(rd.neuron_db).execute("PRAGMA journal_mode=WAL")
    assert rd.neuron_db.is_file()
    with pytest.raises(UserError, match="holds no neuron-DB schema yet.*`safesail db build`"):
        NeuronDB.open(rd.neuron_db)
    run_db_command(cfg, ["build", "--force"])
    with NeuronDB.open(rd.neuron_db) as db:
        assert db.stats()["totals"]["latents"] == 24


def test_first_build_killed_while_creating_leaves_no_schemaless_file(run, tmp_path):
    cfg, rd = run
    flag = tmp_path / "creating"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from safesail.config import compose
        from safesail.neurondb import schema
        from safesail.neurondb.build import build_db
        from safesail.rundir import RunDir

        original = schema.create_version
        def slow(conn, *a, **k):
            Path({str(flag)!r}).touch()
            time.sleep(60)                      # killed here: the file exists, its schema does not yet
            return original(conn, *a, **k)
        schema.create_version = slow
        cfg = compose(["experiment=smoke", "run.root={rd.root.parent}", "device=cpu"])
        build_db(cfg, RunDir.from_cfg(cfg))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert proc.poll() is None and time.time() < deadline, "the build never reached schema creation"
            time.sleep(0.05)
        time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # either no DB at all or a complete one; never a file that blocks every later build
    assert not rd.neuron_db.exists()
    s = build_db(cfg, rd)
    assert s["latents"] == 24
    assert not list(rd.root.glob(".neurons.sqlite.creating-*"))


def integrity_problem(path) -> str | None:
    """SQLite's own verdict on the file, independent of the code under test."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return str(e)
    return None if rows == ["ok"] else "; ".join(rows)


def _corrupt_middle(path, n_bytes=2048):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(os.urandom(n_bytes))


def test_corrupt_db_is_set_aside_and_rebuilt_by_a_plain_build(run):
    cfg, rd = run
    run_db_command(cfg, ["build"])
    _corrupt_middle(rd.neuron_db)
    corrupt = rd.neuron_db.read_bytes()
    assert integrity_problem(rd.neuron_db)
    with pytest.raises(UserError, match="is corrupt .*run `safesail db build`, which sets the corrupt file aside"):
        NeuronDB.open(rd.neuron_db, check=True)
    # the advice works: the stage is marked done, yet the build notices and rebuilds into a fresh file
    run_db_command(cfg, ["build"])
    assert integrity_problem(rd.neuron_db) is None
    aside = [p for p in rd.root.glob("neurons.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == corrupt
    with NeuronDB.open(rd.neuron_db, check=True) as db:
        st = db.stats()
        assert st["totals"] == {"latents": 24, "explained": 24, "tagged": 16}
        assert sum(v["scored"] for v in st["per_layer"].values()) == 24


def test_build_force_over_a_corrupt_db_rebuilds(run):
    cfg, rd = run
    build_db(cfg, rd)
    _corrupt_middle(rd.neuron_db)
    s = build_db(cfg, rd)
    assert s["set_aside"] and s["latents"] == 24 and s["explanations"] == 24
    assert integrity_problem(rd.neuron_db) is None


def test_diagnose_server_refuses_a_corrupt_db_with_advice_that_works(run):
    from safesail.diagnose.engine import DiagnoseEngine

    cfg, rd = run
    build_db(cfg, rd)
    _corrupt_middle(rd.neuron_db)
    with pytest.raises(UserError, match="sets the corrupt file aside and rebuilds"):
        DiagnoseEngine.from_config(cfg)


def test_import_over_a_corrupt_db_imports_into_a_fresh_file(run, tmp_path):
    from pathlib import Path

    from safesail.neurondb.import_safesail import import_release, read_release

    cfg, rd = run
    sample = Path(__file__).resolve().parents[1] / "data" / "safesail_samples" / "en_db.sample.json"
    db = tmp_path / "release.sqlite"
    import_release(db, read_release(sample, {}, {}, {}), "qwen2.5-3b-instruct")
    _corrupt_middle(db, 4096)
    if integrity_problem(db) is None:  # a small file: overwrite its second page instead
        with open(db, "r+b") as f:
            f.seek(4096)
            f.write(os.urandom(4096))
    assert integrity_problem(db)
    s = import_release(db, read_release(sample, {}, {}, {}), "qwen2.5-3b-instruct")
    assert s["set_aside"] and integrity_problem(db) is None
    with NeuronDB.open(db, check=True) as d:
        assert d.stats()["totals"]["explained"] == 35
