"""The per-latent steering-strength scan: fluency check and the strength it keeps."""

from __future__ import annotations

import pytest
import torch

from safesail.chat import encode_chat
from safesail.hooks import HookPoint
from safesail.saes import SAEConfig, build_sae
from safesail.verify.checks import CheckSettings, QuerySet, Verifier
from safesail.verify.interventions import SteerableSAE
from safesail.verify.wave import calibrate, fluent, latent_unit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fluent_needs_a_non_empty_answer_without_loops_close_to_the_models_own():
    assert fluent([1, 2, 3, 4], -2.0, -1.5, 3.0)
    assert not fluent([], 0.0, -1.0, 3.0)
    assert not fluent([7, 7, 7, 7, 7, 8], -0.1, -1.0, 3.0)        # a loop
    assert not fluent([1, 2, 3, 4], -6.0, -1.5, 3.0)               # far less likely than the model's own


def test_calibrate_keeps_the_largest_fluent_strength_of_the_scan(tiny_model):
    lm = tiny_model
    torch.manual_seed(0)
    hp = HookPoint(1)
    sae = build_sae(SAEConfig(arch="topk", d_in=lm.hidden_size, n_latents=4 * lm.hidden_size, k=8, hook=hp.name))
    sae.eval().requires_grad_(False)
    s = SteerableSAE(hp, sae, {3: 1.0})
    enc = [encode_chat(lm.tokenizer, q, None) for q in ("Tell me about bread.", "Name a colour.", "Why is the sky blue?")]
    qs = QuerySet("violence", ["en", "en", "en"], enc, enc)
    v = Verifier(lm, CheckSettings(max_new_tokens=6, batch_size=8), None)
    v.baselines([qs])
    u = latent_unit("latent:x:3", s, {"latent": 3}, qs, 8.0, set(), 0, [])
    # a huge strength turns the tiny model's answers into loops or unlikely text; a small one does not
    calibrate(v, [u], [0.5, 100.0], 3, 3.0)
    scan = u.extra["scan"]
    assert [x["strength"] for x in scan] == [0.5, 100.0]
    assert all(0 <= x["fluent"] <= 1 and 0 <= x["changed"] <= 1 for x in scan)
    fluent_ones = [x["strength"] for x in scan if x["fluent"] >= 2 / 3]
    assert u.extra["strength"] == (max(fluent_ones) if fluent_ones else 0.5)
    assert u.steer.latent_edits[0].strength == u.extra["strength"]


def test_scan_from_the_top_keeps_the_full_scans_strength_with_fewer_rows(tiny_model, monkeypatch):
    import safesail.verify.wave as wave

    lm = tiny_model
    torch.manual_seed(0)
    hp = HookPoint(1)
    sae = build_sae(SAEConfig(arch="topk", d_in=lm.hidden_size, n_latents=4 * lm.hidden_size, k=8, hook=hp.name))
    sae.eval().requires_grad_(False)
    latents = [3, 5, 11, 17, 29]
    s = SteerableSAE(hp, sae, {i: 1.0 for i in latents})
    enc = [encode_chat(lm.tokenizer, q, None) for q in ("Name a colour.", "Why is the sky blue?", "Tell me about bread.")]
    qs = QuerySet("violence", ["en", "en", "en"], enc, enc)
    v = Verifier(lm, CheckSettings(max_new_tokens=3, batch_size=8), None)
    v.baselines([qs])
    rows = []
    real = wave.generate_full
    monkeypatch.setattr(wave, "generate_full", lambda lm_, prompts, *a, **k: rows.append(len(prompts)) or
                        real(lm_, prompts, *a, **k))
    strengths = [0.01, 0.05, 0.2, 0.5, 2.0]
    kept = {}
    for from_top in (False, True):
        units = [latent_unit(f"latent:x:{i}", s, {"latent": i}, qs, 8.0, set(), 0, []) for i in latents]
        rows.clear()
        calibrate(v, units, strengths, 1, 3.0, from_top=from_top)
        kept[from_top] = ([u.extra["strength"] for u in units], [u.extra["scan"] for u in units], sum(rows))
    assert kept[True][0] == kept[False][0]
    assert len(set(kept[False][0])) > 1          # the latents do not all keep the same strength
    for top, full in zip(kept[True][1], kept[False][1]):
        assert top == [x for x in full if x["strength"] in {y["strength"] for y in top}]   # the same figures
        assert top[-1]["strength"] == max(strengths)
    assert kept[True][2] < kept[False][2] == len(strengths) * len(latents)
