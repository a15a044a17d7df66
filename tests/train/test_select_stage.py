"""`safesail select` on the tiny model with SAE folders on disk: choice, files, readers, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from safesail.errors import UserError
from safesail.hooks import HookPoint
from safesail.rundir import RunDir
from safesail.train import selection as S
from safesail.train.pair_activations import capture_pair_activations
from safesail.train.select_stage import run_select_stage
from tests.select_helpers import choose_words, random_sae, save_as_sae_folder, synthetic_pairs, wired_sae, write_pairs

HOOK = "layers.0.mlp_out"
WIRED = {"politics": 11, "pornography": 22, "violence": 33, "terror": 44}
GOOD, RAND = "relu-l1_0.01", "relu-l1_0.02"


@pytest.fixture(scope="module")
def sae_pair(tiny_model):
    """(wired SAE, random SAE) on layer 0 of the tiny model."""
    words = choose_words(tiny_model)
    pairs = synthetic_pairs(words)
    pa = capture_pair_activations(tiny_model, pairs, [HookPoint(0)], "You are a helpful assistant.")
    acts = pa.acts[HOOK]
    tok = tiny_model.tokenizer
    wires = {WIRED[d]: tok.convert_tokens_to_ids("Ġ" + c) for d, (c, _) in words.items()}
    good = wired_sae(acts, pa.token_ids, wires, 128, HOOK, "tiny", seed=1)
    rand = random_sae(acts.shape[1], 128, HOOK, "tiny", seed=2, center=acts.mean(0))
    return good, rand, pairs


@pytest.fixture
def run(smoke_cfg, tmp_path, sae_pair):
    """A config (layer 0 only, synthetic pairs) and its run dir holding the two SAEs."""
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", sae_pair[2])

    def make(*overrides, good_metrics=None):
        cfg = smoke_cfg("model.layers=[0]", f"select.pairs={pairs_file}", *overrides)
        rd = RunDir.from_cfg(cfg)
        good, rand, _ = sae_pair
        if not (rd.saes(HOOK) / GOOD).exists():
            save_as_sae_folder(good, rd.saes(HOOK) / GOOD, good_metrics, l1_coef=0.01)
            save_as_sae_folder(rand, rd.saes(HOOK) / RAND, l1_coef=0.02)
        return cfg, rd

    return make


def test_stage_chooses_the_wired_sae_and_writes_everything(run, capsys):
    cfg, rd = run()
    run_select_stage(cfg, [])
    out = capsys.readouterr().out
    assert "I_CDF" in out and GOOD in out and "highest I_CDF" in out
    sel = S.load_selection(rd)
    assert sel["chosen"][HOOK]["sae"] == GOOD
    assert {r["name"] for r in sel["saes"]} == {GOOD, RAND}
    assert sel["pairs"]["by_domain"] == {d: 6 for d in WIRED}
    for d, j in WIRED.items():
        assert sel["candidates"][HOOK][d][0]["latent"] == j
    assert set(WIRED.values()) <= set(S.candidate_latents(rd, HOOK))
    assert S.chosen_sae_dirs(cfg, rd) == {HOOK: rd.saes(HOOK) / GOOD}
    stats = S.load_pair_stats(rd, HOOK)
    assert stats["latent_ids"].tolist() == list(range(128))
    assert float(stats["terror.concept_rate"][WIRED["terror"]]) == 1.0
    assert float(stats["terror.neutral_rate"][WIRED["terror"]]) == 0.0
    assert float(stats["terror.mean_act_diff"][WIRED["terror"]]) > 0
    assert float(stats["politics.concept_rate"][WIRED["terror"]]) == 0.0
    assert S.pair_stats_metadata(rd, HOOK)["sae"] == GOOD
    png = S.plot_path(rd)
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert rd.stage_done("select", rd.stage_record("select")["fingerprint"])


def test_rerun_skips_and_resume_reuses_per_sae_figures(run, monkeypatch, capsys):
    cfg, rd = run()
    run_select_stage(cfg, [])
    mtime = S.selection_path(rd).stat().st_mtime_ns

    import safesail.models as models

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded when every SAE's figures are cached")

    monkeypatch.setattr(models, "load_model", no_model)
    run_select_stage(cfg, [])          # finished: nothing to do
    assert S.selection_path(rd).stat().st_mtime_ns == mtime
    # a run killed after the per-SAE figures: the choice is rebuilt without the model
    (rd.stages / "select.json").unlink()
    S.selection_path(rd).unlink()
    run_select_stage(cfg, [])
    assert S.load_selection(rd)["chosen"][HOOK]["sae"] == GOOD


def test_guardrail_and_override(run):
    bounds = ("select.max_fvu=0.6", "select.min_ce_loss_recovered=0.5")   # the smoke experiment turns them off
    cfg, rd = run(*bounds, good_metrics={"fvu": 0.95, "l0": 10.0, "ce_loss_recovered": 0.9})
    run_select_stage(cfg, [])
    sel = S.load_selection(rd)
    assert sel["chosen"][HOOK]["sae"] == RAND
    bad = next(r for r in sel["saes"] if r["name"] == GOOD)
    assert not bad["eligible"] and "FVU 0.950 above select.max_fvu" in bad["ineligible_reason"]
    # override in config: re-run select applies it; readers refuse a stale selection
    cfg2, _ = run(*bounds, f"+select.override={{{HOOK}:{GOOD}}}")
    with pytest.raises(UserError, match="run `safesail select` again"):
        S.chosen_sae_dirs(cfg2, rd)
    run_select_stage(cfg2, [])
    assert S.chosen_sae_dirs(cfg2, rd) == {HOOK: rd.saes(HOOK) / GOOD}
    assert S.load_selection(rd)["chosen"][HOOK]["override"] is True
    cfg3, _ = run(f"+select.override={{{HOOK}:topk-k999}}")
    with pytest.raises(UserError, match="holds only"):
        run_select_stage(cfg3, [])


def test_bad_sweeps_give_one_sentence(run, smoke_cfg, tmp_path, sae_pair):
    cfg, rd = run()
    empty_cfg = smoke_cfg("model.layers=[0]", f"select.pairs={tmp_path / 'pairs.jsonl'}", "run.name=empty")
    with pytest.raises(UserError, match="no SAEs found under .*run `safesail train` first"):
        run_select_stage(empty_cfg, [])
    other = smoke_cfg("model.layers=[0]", f"select.pairs={tmp_path / 'pairs.jsonl'}", "run.name=other")
    rd_other = RunDir.from_cfg(other)
    good, _, _ = sae_pair
    good.cfg.model = "qwen2.5-3b-instruct"
    try:
        save_as_sae_folder(good, rd_other.saes(HOOK) / GOOD)
    finally:
        good.cfg.model = "tiny"
    with pytest.raises(UserError, match="trained on the model 'qwen2.5-3b-instruct', not 'tiny'"):
        run_select_stage(other, [])
    with pytest.raises(UserError, match="select.nonsense is not a setting"):
        run_select_stage(smoke_cfg("+select.nonsense=1"), [])


def test_cli_prints_one_sentence_for_a_bad_pairs_file(tmp_path, cache_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "domain": "gambling", "concept": "c", "lang": "en",
                               "concept_query": "a", "neutral_query": "b"}) + "\n")
    env = {**os.environ, "SAFESAIL_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "safesail", "select", "experiment=smoke", f"run.root={tmp_path}",
                        f"select.pairs={bad}"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    lines = [x for x in p.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "unknown domain 'gambling'" in lines[0] and "line 1" in lines[0]
    assert "Traceback" not in p.stderr
