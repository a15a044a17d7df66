"""`safesail run` end to end on the smoke experiment, killed (SIGKILL) at random
points inside every stage and re-run: the final neuron DB must equal the one of
an uninterrupted run (same latents, explanations, scores, tags)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safesail.pipeline import PIPELINE

STAGES = [name for name, _ in PIPELINE]


def _env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SAFESAIL_CACHE=str(cache_dir), HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _cmd(root: Path) -> list[str]:
    return [sys.executable, "-m", "safesail", "run", "experiment=smoke", f"run.root={root}", "device=cpu"]


def _run_to_end(root: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(root), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_during(stage: str, root: Path, env: dict, rng: random.Random, log: Path) -> bool:
    """Start `safesail run`, SIGKILL it a random moment after `stage` starts. False if it finished first."""
    with open(log, "w") as out:
        proc = subprocess.Popen(_cmd(root), env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        marker = f"=== stage {stage} ==="
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if marker in log.read_text(errors="replace"):
                time.sleep(rng.uniform(0.0, 1.5))
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            return False
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _db_content(db_path: Path) -> dict:
    from safesail.neurondb import NeuronDB

    db = NeuronDB.open(db_path)
    try:
        out = {}
        for rec in db.iter_latents():
            out[(rec["hook"], rec["index"])] = (rec["explanation"], rec["score"], tuple(sorted(rec["tags"])),
                                                round(float(rec["quantile_999"]), 5), len(rec["examples"]))
        return out
    finally:
        db.close()


def _assert_same_db(got: dict, clean: dict) -> None:
    """Everything equal, scores to relative 1e-4: the local LLM batches prompts in arrival order,
    so a resumed run's batches differ from a clean run's and move the last bits of a score."""
    assert got.keys() == clean.keys()
    for key, (expl, score, *rest) in clean.items():
        g_expl, g_score, *g_rest = got[key]
        assert (g_expl, g_rest) == (expl, rest), key
        assert (g_score is None) == (score is None), key
        if score is not None:
            assert g_score == pytest.approx(score, rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_db(tmp_path, cache_dir):
    env = _env(cache_dir)
    clean_root = tmp_path / "clean"
    proc = _run_to_end(clean_root, env)
    assert "open the diagnose page with" in proc.stdout
    clean = _db_content(clean_root / "smoke" / "neurons.sqlite")
    assert clean, "the uninterrupted run wrote an empty DB"

    rng = random.Random(1234)
    root = tmp_path / "killed"
    kills = 0
    for stage in STAGES:  # a kill inside every stage, in pipeline order
        if _kill_during(stage, root, env, rng, tmp_path / f"kill-{stage}.log"):
            kills += 1
    assert kills >= 4, "the run finished before most kills; the test no longer exercises resume"
    _run_to_end(root, env)
    _assert_same_db(_db_content(root / "smoke" / "neurons.sqlite"), clean)

    # A finished run re-runs as a no-op and keeps the same DB.
    again = _run_to_end(root, env)
    assert "open the diagnose page with" in again.stdout
    _assert_same_db(_db_content(root / "smoke" / "neurons.sqlite"), clean)


def test_run_refuses_another_experiments_run_dir(tmp_path, cache_dir):
    env = _env(cache_dir)
    run_dir = tmp_path / "runs" / "shared"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("experiment_name: demo\n")
    proc = subprocess.run([sys.executable, "-m", "safesail", "run", "experiment=smoke", f"run.root={tmp_path / 'runs'}",
                           "run.name=shared"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "holds a run of experiment 'demo'" in proc.stderr
    assert (run_dir / "config.yaml").read_text() == "experiment_name: demo\n"


def test_unwritable_run_dir_is_one_sentence(tmp_path, cache_dir):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path under a regular file instead (ENOTDIR).
        blocker = tmp_path / "file"
        blocker.write_text("x")
        root = blocker / "runs"
    else:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o500)
    proc = subprocess.run([sys.executable, "-m", "safesail", "run", "experiment=smoke", f"run.root={root}"],
                          env=_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "run directory" in err[0]
    assert "Traceback" not in proc.stderr
