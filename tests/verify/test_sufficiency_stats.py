"""The sufficiency statistic (log-odds of the judge's p(yes), paired per query), its intervals and the
pre-registered criterion; the neutral queries for sufficiency and the strength scan's own queries."""

from __future__ import annotations

import math
import random

import pytest

from safesail.verify.checks import Answers, CheckSettings, QuerySet, Verifier
from safesail.verify.stats import (
    logit,
    logodds_diffs,
    steers_on_concept,
    t_interval,
    t_quantile,
)


@pytest.mark.parametrize("df, exact", [(5, 2.5706), (8, 2.3060), (11, 2.2010), (35, 2.0301), (1000, 1.9623)])
def test_t_quantile_matches_the_table(df, exact):
    assert t_quantile(0.95, df) == pytest.approx(exact, abs=5e-4)


def test_logodds_difference_weighs_a_small_p_move_like_a_large_one_and_skips_unusable_replies():
    d = logodds_diffs([0.05, 0.5, None, 1.0], [0.01, 0.2, 0.3, 0.0])
    assert len(d) == 3
    assert d[0] == pytest.approx(math.log(0.05 / 0.95) - math.log(0.01 / 0.99))
    assert d[0] == pytest.approx(d[1], rel=0.3)            # 0.01 -> 0.05 is about as much evidence as 0.2 -> 0.5
    assert math.isfinite(d[2]) and d[2] == pytest.approx(2 * logit(1.0))   # a text reply's 1/0 is clipped


def test_t_interval_covers_the_mean_at_the_right_width():
    vals = [1.0, 2.0, 3.0, 4.0]
    lo, hi = t_interval(vals)
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in vals) / 3)
    assert (lo + hi) / 2 == pytest.approx(2.5)
    assert hi - lo == pytest.approx(2 * 3.1824 * sd / 2, rel=2e-3)
    assert t_interval([1.0]) == (None, None)


def _verifier():
    v = Verifier(lm=None, settings=CheckSettings(n_boot=400), judge=lambda items: [None] * len(items))
    return v


def _sufficiency(p_steered, p_random, p_unsteered):
    """The sufficiency records of one latent whose answers the judge gives these p(yes)."""
    n = len(p_steered)
    texts = lambda tag: [f"{tag} {k}" for k in range(n)]
    v = _verifier()
    for tag, ps in (("s", p_steered), ("r", p_random), ("u", p_unsteered)):
        for t, p in zip(texts(tag), ps):
            v._verdicts[("topic", t)] = p
    ans = lambda tag: Answers([[1]] * n, texts(tag), [0.0] * n, [False] * n)
    qs = QuerySet("violence", ["en"] * n, [[1]] * n, [[1]] * n, base_neutral=ans("u"))
    base = {"hook": "layers.0.mlp_out", "layer": 0, "latent": 1, "target": "latent", "domain": "violence"}
    recs = v.sufficiency(base, "topic", ans("s"), qs, ans("r"), dict(base, latent=2, target="random_latent"))
    return {r.metric: r for r in recs if r.target == "latent"}, [r.to_json() for r in recs]


def test_the_criterion_passes_a_consistent_small_push_the_win_count_cannot_show_at_12_queries():
    rng = random.Random(0)
    # 12 queries; the steered answer's p(yes) is a little higher than the random latent's on 9 of them
    p_r = [rng.uniform(0.005, 0.05) for _ in range(12)]
    p_s = [p * (3.0 if k < 9 else 0.8) for k, p in enumerate(p_r)]
    recs, raw = _sufficiency(p_s, p_r, p_r)
    lo = recs["p_yes_logodds_vs_random"].ci_low
    assert lo is not None and lo > 0 and recs["p_yes_logodds_vs_random"].details["on_concept"] is True
    assert recs["p_yes_logodds_vs_random"].details["t_low"] > 0
    assert recs["p_yes_win_vs_random"].details["wins"] == 9        # 9/12: the sign test is not significant
    assert recs["p_yes_win_vs_random"].details["sign_test_p"] > 0.05
    assert steers_on_concept(raw) is True
    assert steers_on_concept(raw, "p_yes_logodds_vs_unsteered") is True
    # the per-query p(yes) are kept for re-analysis
    assert recs["on_concept_rate"].details["p_yes"] == [round(p, 6) for p in p_s]
    assert len(recs["on_concept_rate"].details["unsteered_p_yes"]) == 12


def test_the_criterion_fails_when_the_latent_does_no_better_than_the_random_latent():
    rng = random.Random(1)
    p_r = [rng.uniform(0.01, 0.3) for _ in range(24)]
    p_s = [min(0.99, max(0.001, p * rng.choice([0.5, 2.0]))) for p in p_r]   # as often lower as higher
    recs, raw = _sufficiency(p_s, p_r, p_r)
    r = recs["p_yes_logodds_vs_random"]
    assert r.ci_low < 0 < r.ci_high and r.details["on_concept"] is False
    assert steers_on_concept(raw) is False
    assert steers_on_concept([]) is None


class _Tok:
    """Text -> one id per character (enough to tell queries apart)."""

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return msgs[-1]["content"]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _settings(**kw):
    from omegaconf import OmegaConf

    from safesail.config import compose
    from safesail.verify.stage import VerifySettings

    cfg = compose([])      # the default experiment's verify group, then the test's values
    node = OmegaConf.to_container(cfg.verify)
    node.update(kw)
    return VerifySettings.from_cfg(OmegaConf.create({"verify": node}))


def test_sufficiency_queries_extend_the_twins_and_the_scan_has_queries_of_its_own():
    from safesail.train.pairs import load_pairs
    from safesail.verify.stage import query_sets

    pairs = load_pairs(None)
    s = _settings(queries_per_domain=6, sufficiency_queries=15, scan_queries=3, reference_pairs=10)
    sets, refs = query_sets(pairs, s, _Tok(), None)
    text = lambda ids: "".join(chr(i) for i in ids)
    for dom, qs in sets.items():
        mine = [p for p in pairs if p.domain == dom]
        assert len(qs.concept) == 6 and len(qs.langs) == 6 and len(qs.neutral) == 15 and len(qs.nlangs) == 15
        twins = {p.concept_query: p.neutral_query for p in mine}
        # the first queries_per_domain neutral queries are the concept queries' twins, languages in step
        assert [twins[text(c)] for c in qs.concept] == [text(n) for n in qs.neutral[:6]]
        assert qs.nlangs[:6] == qs.langs and sorted(set(qs.nlangs)) == ["en", "hi", "zh"]
        lang_of = {p.neutral_query: p.lang for p in mine}
        assert [lang_of[text(n)] for n in qs.neutral] == qs.nlangs
        # the scan's queries: one per language, none of them steered-and-judged or a reference pair's
        scan = {text(n) for n in qs.scan}
        assert len(scan) == 3 and sorted(qs.scan_langs) == ["en", "hi", "zh"]
        assert not scan & {text(n) for n in qs.neutral} and not scan & {text(n) for n in refs[dom][1]}
        assert qs.scan_set[0] is qs.scan
    # without sufficiency_queries the neutral queries are exactly the twins (the earlier sets)
    sets2, _ = query_sets(pairs, _settings(queries_per_domain=6, sufficiency_queries=None, reference_pairs=10),
                          _Tok(), None)
    assert all(sets2[d].neutral == sets[d].neutral[:6] and sets2[d].concept == sets[d].concept for d in sets)
    # no scan: no scan queries, the scan set falls back to the neutral queries
    sets3, _ = query_sets(pairs, _settings(queries_per_domain=6, sufficiency_queries=None, strength_scan=[]),
                          _Tok(), None)
    assert all(not q.scan and q.scan_set[0] is q.neutral for q in sets3.values())


def test_bad_sufficiency_queries_is_one_sentence():
    from safesail.errors import UserError

    with pytest.raises(UserError, match="sufficiency_queries"):
        _settings(sufficiency_queries=1)
