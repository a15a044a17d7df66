"""The cache stage under faults: 2 processes, kill -9 and resume, and every bad input (via the real CLI)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cache_helpers import assert_one_sentence, snapshot, write_corpus
from safesail.cli import main
from safesail.config import compose
from safesail.train.activation_store import ActivationStore
from safesail.train.cache import run_cache_stage

HOOKS = ["layers.0.mlp_out", "layers.1.mlp_out", "layers.3.mlp_out"]
REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", n=900)


def overrides(root: Path, corpus: Path, tokens: int, *extra: str) -> list[str]:
    return ["experiment=smoke", f"run.root={root}", "device=cpu", f"data.paths=[{corpus}]",
            f"data.max_tokens={tokens}", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    """An uninterrupted 1-process cache of 400 windows: what every other run must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    run_cache_stage(compose(overrides(root, corpus, 25600, "cache.batch_size=4")), [])
    return root / "smoke"


def by_window(run: Path, hook: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """window index -> (tokens, activations), checking that no window is stored twice."""
    out = {}
    store = ActivationStore(run / "activations" / hook)
    for sh in store.iter_shards():
        for j, w in enumerate(sh["windows"].tolist()):
            assert w not in out, f"window {w} stored twice"
            out[w] = (sh["tokens"][j * 64:(j + 1) * 64], sh["activations"][j * 64:(j + 1) * 64].float())
    files = {p.name for p in (run / "activations" / hook).glob("*.safetensors")}
    assert files == {s["file"] for s in store.meta["shards"]}  # no orphans left behind
    assert not list((run / "activations" / hook).glob(".*.tmp"))
    return out


def assert_same_cache(run: Path, ref: Path) -> None:
    for hook in HOOKS:
        got, want = by_window(run, hook), by_window(ref, hook)
        assert sorted(got) == sorted(want) == list(range(400))
        for w in want:
            assert torch.equal(got[w][0], want[w][0])
            assert torch.allclose(got[w][1], want[w][1], atol=2e-2, rtol=2e-2)


def cli(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    # One thread per process: the tiny model's small matmuls crawl when threads outnumber free cores.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_two_processes_give_the_tokens_of_one(tmp_path, corpus, reference):
    proc = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "safesail",
               "cache", *overrides(tmp_path, corpus, 25600, "cache.batch_size=8"), cwd=tmp_path)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    logs = {p.name for p in (tmp_path / "smoke" / "activations" / HOOKS[0]).glob("progress-r*.jsonl")}
    assert logs == {"progress-r0.jsonl", "progress-r1.jsonl"}  # each rank wrote its own shards
    assert_same_cache(tmp_path / "smoke", reference)


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path, corpus, reference):
    args = ["-m", "safesail", "cache", *overrides(tmp_path, corpus, 25600, "cache.batch_size=1")]
    proc = cli(*args, cwd=tmp_path)
    log = tmp_path / "smoke" / "activations" / HOOKS[0] / "progress-r0.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 40:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = log.read_text().count("\n")
    assert 40 <= done < 400
    assert json.loads((log.parent / "meta.json").read_text())["status"] == "incomplete"
    with pytest.raises(Exception):
        ActivationStore(log.parent)
    # What a kill can also leave: a torn last log line and a renamed-but-unlogged shard.
    with open(log, "a") as f:
        f.write('{"file": "w000000399.safetensors", "wind')
    orphan = log.parent / "w000000399.safetensors"
    orphan.write_bytes(next(log.parent.glob("w*.safetensors")).read_bytes())
    resumed = cli(*args, cwd=tmp_path)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming" in err
    assert_same_cache(tmp_path / "smoke", reference)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["cache", *argv])
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def existing_run(tmp_path, corpus, cache_dir):
    """A finished smoke cache in tmp_path/smoke that bad commands must leave untouched."""
    run_cache_stage(compose(overrides(tmp_path, corpus, 1280)), [])
    return tmp_path / "smoke"


@pytest.mark.parametrize("case", ["model_path", "hub_offline", "layer", "empty_corpus", "non_utf8", "other_width",
                                  "other_model", "other_ctx"])
def test_bad_input_one_sentence_nonzero_nothing_overwritten(case, tmp_path, corpus, existing_run, capsys,
                                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Ein Stra\u00dfencaf\u00e9 in K\u00f6ln.".encode("latin-1"))
    bad = {
        "model_path": (["model=hf", f"model.path={tmp_path / 'no-such-model'}", "model.layers=[0]"], "model.path"),
        "hub_offline": (["model=hf", "model.path=Qwen/Qwen2.5-0.5B-Instruct", "model.layers=[0]"], "hub id"),
        "layer": (["model.layers=[0,9]"], "out of range"),
        "empty_corpus": ([f"data.paths=[{tmp_path / 'empty.jsonl'}]"], "no documents"),
        "non_utf8": ([f"data.paths=[{tmp_path / 'latin1.txt'}]"], "not valid UTF-8"),
        "other_width": (["model.hidden_size=32", "model.intermediate_size=64"], "width d 64, not 32"),
        "other_model": (["model.architecture=qwen2"], "model weights"),
        "other_ctx": (["data.ctx_len=32"], "data.ctx_len 64, not 32"),
    }[case]
    before = snapshot(existing_run)
    code, err = run_cli(capsys, *overrides(tmp_path, corpus, 1280), *bad[0])
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and bad[1] in lines[0] and "Traceback" not in err, err
    assert_one_sentence(lines[0].removeprefix("error: "))
    assert snapshot(existing_run) == before


def test_bad_input_exit_status_from_a_fresh_process(tmp_path, corpus):
    proc = cli("-m", "safesail", "cache", *overrides(tmp_path, corpus, 1280, "model.layers=[7]"), cwd=tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "out of range" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "smoke" / "activations").exists()
