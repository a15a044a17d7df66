"""Concept-contrastive metrics on hand-made activation tables with known answers."""

from __future__ import annotations

import pytest
import torch

from safesail.train import contrastive as C

# 4 pairs (2 politics, 2 violence), 4 latents; rows = pairs, columns = latents.
CONCEPT = torch.tensor([[1.0, 1.0, 0.0, 2.0],
                        [0.8, 1.0, 0.0, 0.0],
                        [0.9, 1.0, 0.0, 0.0],
                        [1.0, 1.0, 0.0, 0.0]])
NEUTRAL = torch.tensor([[0.1, 0.9, 1.0, 0.0],
                        [0.0, 0.9, 0.0, 2.0],
                        [0.0, 0.9, 1.0, 0.0],
                        [0.4, 0.9, 0.0, 0.0]])
DOMAINS = ["politics", "politics", "violence", "violence"]
# With tau = 0.5 and scales s = [1, 1, 1, 2]:
#  latent 0 fires on every concept query and no twin       -> d = 1, r = 0
#  latent 1 fires on both sides of every pair               -> d = r = 0
#  latent 2 fires on the twins of pairs 0 and 2 only         -> r = 0.5 in each domain
#  latent 3 fires on concept 0 and on twin 1 (both politics) -> d = r = 0.5 in politics


def _stats(correct=True, threshold=0.5):
    return C.contrast_stats(CONCEPT, NEUTRAL, DOMAINS, threshold, correct_for_chance=correct,
                            domain_order=["politics", "violence"])


def test_rates_and_frequencies_match_hand_computation():
    s = _stats()
    assert s.groups == ["politics", "violence", "all"]
    assert s.n_pairs == {"politics": 2, "violence": 2, "all": 4}
    assert torch.equal(s.concept_rate["politics"], torch.tensor([1.0, 1.0, 0.0, 0.5]))
    assert torch.equal(s.neutral_rate["politics"], torch.tensor([0.0, 1.0, 0.5, 0.5]))
    assert torch.equal(s.distinguish["politics"], torch.tensor([1.0, 0.0, 0.0, 0.5]))
    assert torch.equal(s.reverse["politics"], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert torch.equal(s.freq["politics"], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(s.freq["violence"], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(s.distinguish["all"], torch.tensor([1.0, 0.0, 0.0, 0.25]))
    assert torch.allclose(s.mean_act_diff["politics"], torch.tensor([0.85, 0.1, -0.5, 0.0]))


def test_uncorrected_frequency_is_the_papers_one_sided_count():
    s = _stats(correct=False)
    assert torch.equal(s.freq["politics"], torch.tensor([1.0, 0.0, 0.0, 0.5]))


def test_l0_t_and_i_cdf():
    s = _stats()
    figs = C.sae_figures(s, [0.25, 0.5, 1.0])
    assert figs["politics"]["l0"] == {"0.25": 1, "0.5": 1, "1": 1}
    assert figs["politics"]["i_cdf"] == pytest.approx(0.25)
    assert figs["politics"]["i_cdf_uncorrected"] == pytest.approx(0.375)
    assert figs["macro"]["i_cdf"] == pytest.approx(0.25)
    u = C.sae_figures(_stats(correct=False), [0.25, 0.5, 0.75])
    assert u["politics"]["l0"] == {"0.25": 2, "0.5": 2, "0.75": 1}
    assert u["all"]["l0"] == {"0.25": 2, "0.5": 1, "0.75": 1}


def test_i_cdf_is_the_area_under_the_normalised_l0_curve():
    g = torch.Generator().manual_seed(0)
    freq = torch.rand(500, generator=g) ** 3
    ts = torch.linspace(0, 1, 20001)[1:]
    area = sum(C.l0_t(freq, ts.tolist()).values()) / freq.numel() / len(ts)
    assert C.i_cdf(freq) == pytest.approx(area, abs=1e-3)


def test_firing_threshold_is_relative_to_each_latents_scale():
    qmax = torch.tensor([[0.3, 3.0], [1.0, 10.0], [0.0, 0.0]])
    scale = C.latent_scale(qmax)
    assert torch.equal(scale, torch.tensor([1.0, 10.0]))
    fired = C.fires(qmax, scale, 0.25)
    assert fired.tolist() == [[True, True], [True, True], [False, False]]
    # a latent that never fires has scale 0 and never counts as firing, even at threshold 0
    assert not C.fires(torch.zeros(2, 1), torch.zeros(1), 0.0).any()


def test_query_max_takes_the_largest_code_per_query():
    codes = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5], [0.0, 3.0]])
    qi = torch.tensor([0, 0, 2, 2])
    out = C.query_max(codes, qi, 3)
    assert out.tolist() == [[2.0, 1.0], [0.0, 0.0], [0.5, 3.0]]


def test_top_latents_ranks_by_frequency_then_gap_and_applies_min_freq():
    s = _stats(correct=False)
    top = C.top_latents(s, "politics", n=5, min_freq=0.1)
    assert [x["latent"] for x in top] == [0, 3]
    assert top[0]["freq"] == 1.0 and top[0]["concept_rate"] == 1.0 and top[0]["neutral_rate"] == 0.0
    assert C.top_latents(s, "politics", n=1, min_freq=0.1)[0]["latent"] == 0
    assert [x["latent"] for x in C.top_latents(s, "politics", n=5, min_freq=0.75)] == [0]


def test_stats_round_trip_through_flat_tensors():
    s = _stats()
    t = C.stats_tensors(s)
    assert t["latent_ids"].tolist() == [0, 1, 2, 3]
    assert {"politics.concept_rate", "politics.neutral_rate", "politics.mean_act_diff",
            "all.freq"} <= set(t)
    back = C.stats_from_tensors(t)
    assert back.groups == ["politics", "violence", "all"]
    assert torch.equal(back.freq["politics"], s.freq["politics"])


def test_swapped_mask_marks_tokens_absent_from_the_twin():
    # pair 0: queries 0 (ids 5 6 7) and 1 (ids 5 8 7); pair 1: queries 2 (ids 9 9) and 3 (ids 9)
    qi = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
    ids = torch.tensor([5, 6, 7, 5, 8, 7, 9, 9, 9])
    assert C.swapped_mask(qi, ids, 4).tolist() == [False, True, False, False, True, False, False, False, False]


def test_word_score_rewards_firing_on_the_concept_words_and_penalises_shared_ones():
    # latent 0 fires on the concept's own word in both pairs; latent 1 on it too, but also on a shared
    # token of every query (broad); latent 2 on the twin's swapped word
    cw = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    nw = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    cs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    ns = cs.clone()
    cmax, nmax = torch.maximum(cw, cs), torch.maximum(nw, ns)
    s = C.contrast_stats(cmax, nmax, ["terror", "terror"], 0.5, words=(cw, nw, cs, ns))
    assert s.word_rate["terror"].tolist() == [1.0, 1.0, 0.0]
    assert s.word_reverse["terror"].tolist() == [0.0, 0.0, 1.0]
    assert s.shared_rate["terror"].tolist() == [0.0, 1.0, 0.0]
    assert s.word_score["terror"].tolist() == [1.0, 0.0, -1.0]
    top = C.top_latents(s, "terror", 3, 0.05, rank="word")
    assert [x["latent"] for x in top] == [0] and top[0]["score"] == 1.0
    # by freq, the broad latent 1 never distinguishes a pair (it fires on both queries) either; latent 0 does
    assert [x["latent"] for x in C.top_latents(s, "terror", 3, 0.05, rank="freq")] == [0]


def test_word_rank_keeps_the_freq_candidates_after_the_word_ones():
    # latent 0 fires on the concept words; latent 1 tells the pairs apart only through a shared token
    # (word_score < 0, f = 1): under rank=word it still is a candidate, ranked after latent 0
    cw = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    nw = torch.zeros(2, 2)
    cs = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    ns = torch.zeros(2, 2)
    s = C.contrast_stats(torch.maximum(cw, cs), torch.maximum(nw, ns), ["violence"] * 2, 0.5,
                         words=(cw, nw, cs, ns))
    assert s.word_score["violence"].tolist() == [1.0, -0.5] and s.freq["violence"].tolist() == [1.0, 1.0]
    assert [x["latent"] for x in C.top_latents(s, "violence", 5, 0.05, rank="word")] == [0, 1]
    assert [x["latent"] for x in C.top_latents(s, "violence", 1, 0.05, rank="word")] == [0]
