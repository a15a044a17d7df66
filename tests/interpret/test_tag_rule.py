"""The tag rule is measured on pairs: query-level precision and recall per domain, pair evidence held out."""

from __future__ import annotations

import pytest
import torch

from safesail.interpret.tag_rule import choose, fold_of, two_fold

S = {"alpha": 0.05, "min_concept_rate": 0.2, "min_rate_diff": 0.15, "min_act_diff": 0.0}
DOMS = ["politics", "pornography", "violence", "terror"]
N = 24


def _tables():
    """96 pairs (24 a domain). Latent 0 fires on violence concepts only; latent 1 on every query;
    latent 2 on terror concepts only."""
    ids = [f"{d}-{i}" for d in DOMS for i in range(N)]
    domains = [d for d in DOMS for _ in range(N)]
    cmax = torch.zeros(4 * N, 3)
    nmax = torch.zeros(4 * N, 3)
    cmax[2 * N:3 * N, 0] = 1.0
    cmax[:, 1] = nmax[:, 1] = 1.0
    cmax[3 * N:, 2] = 2.0
    return cmax, nmax, ids, domains


def test_folds_split_the_pairs_stably():
    ids = [f"p{i}" for i in range(200)]
    folds = [fold_of(i) for i in ids]
    assert folds == [fold_of(i) for i in ids] and 70 < sum(folds) < 130


def test_rules_are_measured_on_held_out_pairs():
    cmax, nmax, ids, domains = _tables()
    # The LLM: right about latent 0, wrong about latent 1 (politics), misses latent 2.
    llm = [{"status": "ok", "domains": ["violence"]}, {"status": "ok", "domains": ["politics"]},
           {"status": "ok", "domains": []}]
    got = two_fold(cmax, nmax, ids, domains, llm, threshold=0.1, s=S)
    assert set(got) == {"either", "both", "pairs_only", "llm_only"}
    v = got["both"]["domains"]["violence"]
    assert (v["tp"], v["fp"], v["fn"], v["precision"], v["recall"]) == (N, 0, 0, 1.0, 1.0)
    assert got["both"]["domains"]["terror"]["recall"] == 0.0          # the LLM missed it: both refuses
    t = got["pairs_only"]["domains"]["terror"]
    assert (t["precision"], t["recall"]) == (1.0, 1.0)
    # latent 1 fires on all 8N queries: llm_only's politics predicts every query, N of them right
    p = got["llm_only"]["domains"]["politics"]
    assert (p["tp"], p["fp"], p["precision"], p["recall"]) == (N, 7 * N, 0.125, 1.0)
    assert got["pairs_only"]["domains"]["politics"]["latents"] == 0   # no pair evidence for latent 1
    assert got["pairs_only"]["domains"]["pornography"]["precision"] is None
    assert got["pairs_only"]["macro_f1"] == pytest.approx(0.5)
    assert got["both"]["macro_f1"] == pytest.approx(0.25)
    assert choose(got) == "either"   # violence + terror right, politics F1 0.22 > 0
    # Without the wrong politics tag pairs_only and either tie; the tie goes to better precision.
    llm[1] = {"status": "ok", "domains": []}
    got = two_fold(cmax, nmax, ids, domains, llm, threshold=0.1, s=S)
    assert got["either"]["macro_f1"] == got["pairs_only"]["macro_f1"] == 0.5
    assert choose(got) in ("either", "pairs_only")


def test_pair_evidence_is_not_measured_on_its_own_pairs():
    # A latent that fires on the violence concepts of one fold only: the pair evidence of that fold
    # passes, and is then measured on the other fold, where it predicts nothing.
    cmax, nmax, ids, domains = _tables()
    lat = torch.zeros(4 * N, 1)
    for i in range(2 * N, 3 * N):
        if fold_of(ids[i]) == 0:
            lat[i, 0] = 1.0
    got = two_fold(lat, torch.zeros(4 * N, 1), ids, domains, [None], threshold=0.1,
                   s={**S, "alpha": 0.5, "min_concept_rate": 0.1, "min_rate_diff": 0.05})
    v = got["pairs_only"]["domains"]["violence"]
    assert v["tp"] == 0 and v["latents"] == 0.5
