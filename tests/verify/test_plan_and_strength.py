"""Which latents verify checks first, and steering strengths in units of the residual stream's norm."""

from __future__ import annotations

import json

import pytest
import torch

from safesail.hooks import HookPoint, capture_activations
from safesail.saes import SAEConfig, build_sae
from safesail.verify.interventions import SteerableSAE
from safesail.verify.stage import _scores, informative_order, score_rank
from safesail.verify.steering import quantile_strength, residual_norm


def _item(hook, latent, domain):
    return {"hook": hook, "latent": latent, "domain": domain, "tagged": True, "explanation": "x"}


def test_round_robin_over_hook_and_domain_best_explained_first():
    L0, L7, L14 = "layers.0.mlp_out", "layers.7.mlp_out", "layers.14.mlp_out"
    items = [_item(L0, 1, "violence"), _item(L0, 2, "violence"), _item(L0, 3, "terror"),
             _item(L7, 700, "pornography"), _item(L7, 4156, "pornography"), _item(L14, 158, "violence"),
             _item(L0, 9, "politics")]
    scores = {(L0, 1): {"value": 0.1, "beats_shuffled": True}, (L0, 2): {"value": 0.5, "beats_shuffled": True},
              (L0, 3): {"value": 0.9, "beats_shuffled": False}, (L7, 700): {"value": 0.6, "beats_shuffled": True},
              (L7, 4156): {"value": 0.4, "beats_shuffled": True}, (L14, 158): {"value": 0.3, "beats_shuffled": True},
              (L0, 9): {"value": 0.8, "status": "failed"}}
    got = [(it["hook"], it["latent"]) for it in informative_order(items, scores)]
    # first round: the best of each (hook, domain), groups by their best; explanations that beat their
    # shuffled control before those that do not, failed scores last; then the second of each group
    assert got == [(L7, 700), (L0, 2), (L14, 158), (L0, 3), (L0, 9), (L7, 4156), (L0, 1)]
    assert sorted(got) == sorted((it["hook"], it["latent"]) for it in items)


def test_score_rank_and_reading_scores(tmp_path):
    assert score_rank(None) < score_rank({"value": -0.5}) < score_rank({"value": 0.1, "beats_shuffled": True})
    assert score_rank({"value": 0.9, "status": "failed"}) == score_rank(None)

    class RD:
        interpret = tmp_path
    rows = [{"hook": "h", "latent": 1, "kind": "simulation", "value": 0.3},
            {"hook": "h", "latent": 1, "kind": "detection", "value": 0.9},
            {"hook": "h", "latent": 2, "kind": "detection", "value": 0.2}]
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = _scores(RD())
    assert got[("h", 1)]["value"] == 0.3 and got[("h", 2)]["value"] == 0.2


@pytest.mark.usefixtures("one_thread")
def test_residual_norm_and_the_strength_it_means(tiny_model):
    lm = tiny_model
    prompts = [lm.tokenizer(t)["input_ids"] for t in ("How do I bake bread?", "Tell me about the sea today.")]
    hp = HookPoint(1)
    R = residual_norm(lm, hp, prompts)
    resid = HookPoint(1, "resid")
    norms = []
    for p in prompts:
        x = capture_activations(lm.model, torch.tensor([p]), None, [resid])[resid.name][0].float()
        norms.append(x[1:].norm(dim=-1))
    assert R == pytest.approx(float(torch.cat(norms).median()), rel=1e-5) and R > 0
    # a residual-unit strength a adds a vector of norm a * R along the decoder row
    sae = build_sae(SAEConfig(arch="topk", d_in=lm.hidden_size, n_latents=4 * lm.hidden_size, k=8, hook=hp.name))
    s = SteerableSAE(hp, sae.eval(), {5: 0.7})
    q = quantile_strength(0.7, float(s.direction(5).norm()), 2.0, R)
    assert q * 0.7 * float(s.direction(5).norm()) == pytest.approx(2.0 * R, rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_a_residual_unit_latent_and_its_control_are_steered_with_strength_times_the_norm(latent3_unit_inputs):
    from safesail.verify.wave import latent_unit

    hp, s, qs = latent3_unit_inputs
    u = latent_unit("latent:x:3", s, {"latent": 3}, qs, 4.0, set(), 0, [], resid_norm=10.0)
    added = u.steer.per_hook[hp].add
    assert float(added.norm()) == pytest.approx(40.0, rel=1e-4)      # above the old 100 x quantile cap
    assert float(u.control.per_hook[hp].add.norm()) == pytest.approx(40.0, rel=1e-4)
    assert u.extra["strength"] == 4.0 and u.extra["quantile_strength"] > 100
