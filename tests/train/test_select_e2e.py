"""End to end on the smoke experiment: `safesail cache`, `train`, `select` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from safesail.train.pairs import resolve_pairs_path


def _safesail(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "safesail", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_cache_train_select_on_the_smoke_experiment(tmp_path, cache_dir):
    if not resolve_pairs_path(None).exists():
        pytest.skip("the bundled pairs file data/pairs/contrastive_pairs.jsonl has not landed yet")
    env = {**os.environ, "SAFESAIL_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    common = ["experiment=smoke", f"run.root={tmp_path}", "device=cpu", "model.layers=[1]", "data.max_tokens=4096"]
    for stage in ("cache", "train"):
        p = _safesail([stage, *common], env)
        assert p.returncode == 0, p.stderr[-2000:]
    p = _safesail(["select", *common], env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "I_CDF" in p.stdout and "layers.1.mlp_out" in p.stdout and "selection written to" in p.stdout
    run = tmp_path / "smoke"
    sel = json.loads((run / "selection.json").read_text())
    names = {r["name"] for r in sel["saes"]}
    assert names == {"topk-k4", "topk-k8", "batchtopk-k8"}
    assert sel["chosen"]["layers.1.mlp_out"]["sae"] in names
    assert sel["pairs"]["n_pairs"] >= 4 * 90
    assert (run / "selection.png").is_file()
    assert (run / "selection" / "layers.1.mlp_out.pairstats.safetensors").is_file()

    from safesail.config import compose
    from safesail.train.selection import candidate_latents, chosen_sae_dirs, load_pair_stats

    cfg = compose(common)
    dirs = chosen_sae_dirs(cfg, run)
    assert dirs["layers.1.mlp_out"].name == sel["chosen"]["layers.1.mlp_out"]["sae"]
    stats = load_pair_stats(run, "layers.1.mlp_out")
    n = stats["latent_ids"].numel()
    assert all(0 <= j < n for j in candidate_latents(run, "layers.1.mlp_out"))
    assert {"violence.concept_rate", "terror.neutral_rate", "politics.mean_act_diff"} <= set(stats)
    # a second run does nothing
    again = _safesail(["select", *common], env)
    assert again.returncode == 0 and "nothing to do" in again.stderr
