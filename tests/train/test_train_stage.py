"""`safesail train` on the smoke experiment: sweep, files, re-run, resume after a kill, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safesail.errors import UserError

HOOKS = "sae.hooks=[layers.0.mlp_out,layers.1.mlp_out]"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory, cache_dir):
    """A small smoke-experiment activation cache (tiny model, 2,048 tokens), built once."""
    from safesail.config import compose
    from safesail.train.cache import run_cache_stage

    root = tmp_path_factory.mktemp("cache")
    cfg = compose(["experiment=smoke", f"run.root={root}", "run.name=base", f"cache_dir={cache_dir}", "device=cpu",
                   "data.max_tokens=2048"])
    run_cache_stage(cfg, [])
    return root / "base" / "activations"


@pytest.fixture
def run_cfg(tmp_path, cache_dir, smoke_cache):
    """Config factory for a fresh run directory that already holds the smoke cache."""
    from safesail.config import compose

    def make(*overrides: str, name: str = "r"):
        target = tmp_path / name / "activations"
        if not target.exists():
            shutil.copytree(smoke_cache, target)
        return compose(["experiment=smoke", f"run.root={tmp_path}", f"run.name={name}", f"cache_dir={cache_dir}",
                        "device=cpu", "data.max_tokens=2048", HOOKS, *overrides])

    return make


def test_train_stage_writes_the_sweep(run_cfg, tmp_path, capsys):
    from safesail.saes import list_saes, load_sae
    from safesail.train.stage import run_train_stage

    cfg = run_cfg()
    run_train_stage(cfg, [])
    saes = tmp_path / "r" / "saes"
    folders = list_saes(saes)
    assert [f"{f.parent.name}/{f.name}" for f in folders] == [
        f"{h}/{n}" for h in ("layers.0.mlp_out", "layers.1.mlp_out") for n in ("batchtopk-k8", "topk-k4", "topk-k8")]
    m = json.loads((folders[1] / "metrics.json").read_text())
    for key in ("fvu", "l0", "dead_fraction", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablation",
                "ce_loss_recovered", "kl_to_clean", "tokens_trained", "config"):
        assert key in m, key
    assert m["evaluated"] and m["l0"] == pytest.approx(4.0) and 0 < m["fvu"] < 1.5 and m["kl_to_clean"] >= 0
    assert m["ce_loss_zero_ablation"] != m["ce_loss_clean"]
    sae = load_sae(folders[1])
    assert sae.cfg.arch == "topk" and sae.cfg.k == 4 and sae.cfg.d_in == 64 and sae.cfg.n_latents == 256
    assert sae.cfg.model == "tiny" and sae.cfg.hook == "layers.0.mlp_out"
    sweep = json.loads((saes / "sweep.json").read_text())
    assert len(sweep["saes"]) == 6 and (saes / "sweep.png").stat().st_size > 1000
    assert "topk-k8" in capsys.readouterr().out
    assert not list((saes / ".train").glob("*.pt"))  # the checkpoint is gone once the SAEs are saved

    before = {f: (f / "sae.safetensors").stat().st_mtime_ns for f in folders}
    run_train_stage(cfg, [])  # finished: nothing is redone
    assert {f: (f / "sae.safetensors").stat().st_mtime_ns for f in folders} == before

    with pytest.raises(UserError, match="trained with other settings"):
        run_train_stage(run_cfg("train.lr_decay_fraction=0.5"), [])
    assert {f: (f / "sae.safetensors").stat().st_mtime_ns for f in folders} == before


def test_optimizer_auto_is_resolved_before_the_fingerprint(run_cfg, tmp_path):
    """train.optimizer=auto: a short run is the signum run (same folders, same fingerprint: nothing to redo);
    a run past AUTO_ADAM_STEPS steps trains with Adam and says so in cfg.json."""
    from safesail.saes import list_saes, read_cfg
    from safesail.train.stage import run_train_stage

    one = ["sae.saes=[{arch:topk,k:4}]", "sae.hooks=[layers.0.mlp_out]"]
    run_train_stage(run_cfg("train.optimizer=signum", *one, name="auto"), [])
    [folder] = list_saes(tmp_path / "auto" / "saes")
    before = (folder / "sae.safetensors").stat().st_mtime_ns
    run_train_stage(run_cfg("train.optimizer=auto", *one, name="auto"), [])   # ~6 steps: signum, already done
    assert (folder / "sae.safetensors").stat().st_mtime_ns == before and read_cfg(folder).optimizer == "signum"
    run_train_stage(run_cfg("train.optimizer=auto", "train.batch_size=16", *one, name="auto_long"), [])  # ~100 steps
    [folder] = list_saes(tmp_path / "auto_long" / "saes")
    assert read_cfg(folder).optimizer == "adam"
    assert json.loads((folder / "metrics.json").read_text())["steps"] >= 64


def test_split_recipe_keys_reach_the_trainer_and_the_fingerprint(run_cfg, tmp_path):
    """train.split_every / split_cos / resample_until: off by default (fingerprints as before the keys existed);
    set, they retrain (other settings) and the trainer's splits are recorded in metrics.json."""
    from safesail.saes import list_saes
    from safesail.train.stage import run_train_stage

    one = ["sae.saes=[{arch:pursuit,k:4,refit:ls,select:decoder}]", "sae.hooks=[layers.0.mlp_out]",
           "train.batch_size=64", "train.eval.ce_tokens=0"]
    run_train_stage(run_cfg(*one, name="split"), [])
    [folder] = list_saes(tmp_path / "split" / "saes")
    assert "split" not in json.loads((folder / "metrics.json").read_text())
    run_train_stage(run_cfg(*one, "train.split_every=0", "train.split_cos=0.9", name="split"), [])   # the defaults
    with pytest.raises(UserError, match="trained with other settings"):
        run_train_stage(run_cfg(*one, "train.split_every=2", "train.split_cos=0.5", name="split"), [])
    run_train_stage(run_cfg(*one, "train.split_every=2", "train.split_cos=0.5", "train.resample_until=0.9",
                            name="split2"), [])
    [folder] = list_saes(tmp_path / "split2" / "saes")
    assert json.loads((folder / "metrics.json").read_text())["split"] >= 0
    for bad, words in (("train.split_cos=1.5", "train.split_cos"), ("train.split_every=-1", "train.split_every")):
        with pytest.raises(UserError, match=words):
            run_train_stage(run_cfg(*one, bad, name="split3"), [])


def test_warm_k_keys_reach_the_trainer_and_the_fingerprint(run_cfg, tmp_path):
    """train.warm_k / warm_until (the planted recipe's warm phase): off by default, fingerprinted only when on,
    and a bad value is one sentence before anything trains."""
    from safesail.saes import list_saes, read_cfg
    from safesail.train.stage import run_train_stage

    one = ["sae.saes=[{arch:pursuit,k:4,refit:ls,select:decoder,stop:0.06}]", "sae.hooks=[layers.0.mlp_out]",
           "train.batch_size=64", "train.eval.ce_tokens=0"]
    run_train_stage(run_cfg(*one, name="warm"), [])
    run_train_stage(run_cfg(*one, "train.warm_k=0", "train.warm_until=0.3", name="warm"), [])   # the defaults
    with pytest.raises(UserError, match="trained with other settings"):
        run_train_stage(run_cfg(*one, "train.warm_k=2", name="warm"), [])
    run_train_stage(run_cfg(*one, "train.warm_k=2", "train.warm_until=0.5", name="warm2"), [])
    [folder] = list_saes(tmp_path / "warm2" / "saes")
    cfg = read_cfg(folder)
    assert (cfg.k, cfg.stop) == (4, 0.06)   # the saved SAE keeps its own k and stop after the warm phase
    for bad, words in (("train.warm_k=-1", "train.warm_k"), ("train.warm_until=0", "train.warm_until"),
                       ("train.warm_k=9", "warm_k must be")):
        with pytest.raises(UserError, match=words):
            run_train_stage(run_cfg(*one, bad, name="warm3"), [])


def _stage_cmd(tmp_path, cache_dir, name):
    return [sys.executable, "-m", "safesail", "train", *_kill_overrides(tmp_path, cache_dir, name)]


def _kill_overrides(tmp_path, cache_dir, name):
    return ["experiment=smoke", f"run.root={tmp_path}", f"run.name={name}", f"cache_dir={cache_dir}", "device=cpu",
            "data.max_tokens=2048", "sae.hooks=[layers.1.mlp_out]", "sae.arch=topk",
            "train.eval.ce_tokens=0", "train.checkpoint_every=5", "train.batch_size=128", "train.epochs=12"]


def test_stage_resumes_after_kill(run_cfg, tmp_path, cache_dir):
    """SIGKILL the stage after its first checkpoint; the re-run equals an uninterrupted run exactly."""
    from safesail.config import compose
    from safesail.saes import list_saes, load_sae
    from safesail.train.stage import run_train_stage

    run_cfg(name="killed")
    run_cfg(name="whole")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(_stage_cmd(tmp_path, cache_dir, "killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ck_dir = tmp_path / "killed" / "saes" / ".train"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ck_dir.glob("*.pt")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(ck_dir.glob("*.pt")), "no checkpoint was written before the kill"
    assert not list_saes(tmp_path / "killed" / "saes")
    ck = torch.load(next(ck_dir.glob("*.pt")), weights_only=False)
    assert 5 <= ck["batches_done"] < 12 * 14
    for name in ("killed", "whole"):  # resume the killed run; train the other from scratch, in this process
        run_train_stage(compose(_kill_overrides(tmp_path, cache_dir, name)), [])
    a, b = list_saes(tmp_path / "killed" / "saes"), list_saes(tmp_path / "whole" / "saes")
    assert [p.name for p in a] == [p.name for p in b] == ["topk-k4", "topk-k8"]
    for fa, fb in zip(a, b):
        sa, sb = load_sae(fa).state_dict(), load_sae(fb).state_dict()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


def test_bad_input(run_cfg, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from safesail.train.stage import run_train_stage

    with pytest.raises(UserError, match="larger than the SAE width"):
        run_train_stage(run_cfg("sae.k=1000"), [])
    with pytest.raises(UserError, match="64 wide but sae.d_in=99"):
        run_train_stage(run_cfg("sae.d_in=99"), [])
    with pytest.raises(UserError, match="fewer than one batch"):
        run_train_stage(run_cfg("train.batch_size=100000"), [])
    with pytest.raises(UserError, match="no activation cache"):
        run_train_stage(run_cfg("sae.hooks=[layers.2.mlp_out]"), [])
    # NaN in the cache: reported with the batch and hook
    cfg = run_cfg(name="nan")
    for path in (tmp_path / "nan" / "activations" / "layers.1.mlp_out").glob("w*.safetensors"):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        t["activations"][:, 3] = float("nan")
        save_file(t, str(path), metadata=meta)  # same header, same size: the shard check passes
    with pytest.raises(UserError, match=r"NaN/inf \(batch 0 of hook layers.1.mlp_out"):
        run_train_stage(cfg, [])
    assert not (tmp_path / "nan" / "saes" / "layers.0.mlp_out" / "topk-k4").exists()
