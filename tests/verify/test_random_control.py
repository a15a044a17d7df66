"""verify.random_latents: several random control latents of the same norm per latent; the control's p(yes)
of a query is their mean, so one random direction that breaks its answers cannot decide the comparison."""

from __future__ import annotations

import pytest

from safesail.verify.checks import Answers, CheckSettings, QuerySet, Verifier
from safesail.verify.stats import logit


class _SAE:
    """Just enough of a SteerableSAE for `random_latents`."""
    n_latents = 50

    class hook:
        layer = 3


def test_random_latents_are_distinct_avoid_the_excluded_and_start_with_the_single_control():
    from safesail.verify.wave import random_latent, random_latents

    ex = {1, 2, 3, 7}
    one = random_latent(_SAE, 7, ex, 0)
    many = random_latents(_SAE, 7, ex, 0, 5)
    assert many[0] == one and len(set(many)) == 5 and not set(many) & ex
    assert random_latents(_SAE, 7, ex, 0, 5) == many                  # seeded
    assert len(random_latents(_SAE, 7, set(range(45)), 0, 16)) == 5   # no more than there are


def _answers(tag: str, n: int) -> Answers:
    return Answers([[1]] * n, [f"{tag} {k}" for k in range(n)], [0.0] * n, [False] * n)


def test_the_control_of_a_query_is_the_mean_p_yes_of_the_random_latents():
    n = 6
    v = Verifier(lm=None, settings=CheckSettings(n_boot=100), judge=lambda items: [None] * len(items))
    p = {"s": [0.2] * n, "u": [0.1] * n, "r0": [0.001] * n, "r1": [0.3] * n, "r2": [0.35] * n}   # r0 broke its answers
    for tag, ps in p.items():
        for k, x in enumerate(ps):
            v._verdicts[("topic", f"{tag} {k}")] = x
    qs = QuerySet("violence", ["en"] * n, [[1]] * n, [[1]] * n, base_neutral=_answers("u", n))
    base = {"hook": "layers.3.mlp_out", "layer": 3, "latent": 7, "target": "latent", "domain": "violence"}
    cb = lambda j: dict(base, latent=j, target="random_latent")
    one = {r.metric: r for r in v.sufficiency(base, "topic", _answers("s", n), qs, _answers("r0", n), cb(10))
           if r.target == "latent"}
    recs = v.sufficiency(base, "topic", _answers("s", n), qs, _answers("r0", n), cb(10),
                         [(_answers("r1", n), cb(11)), (_answers("r2", n), cb(12))])
    mine = {r.metric: r for r in recs if r.target == "latent"}
    ctrl = [r for r in recs if r.target == "random_latent"]
    assert sorted(r.latent for r in ctrl) == [10, 11, 12] and all(len(r.details["p_yes"]) == n for r in ctrl)
    mean_p = (0.001 + 0.3 + 0.35) / 3
    assert mine["p_yes_logodds_vs_random"].value == pytest.approx(logit(0.2) - logit(mean_p), rel=1e-6)
    assert mine["on_concept_rate"].details["random_latents"] == 3
    assert mine["on_concept_rate"].details["random_p_yes"] == [round(mean_p, 6)] * n
    # one broken random latent alone makes the latent pass; the mean of three does not
    assert one["p_yes_logodds_vs_random"].ci_low > 0
    assert mine["p_yes_logodds_vs_random"].value < 0
    # every control's answers are judged in the wave's batch
    items = v.judge_items("topic", _answers("s", n), qs, _answers("r0", n), [_answers("r1", n), _answers("r2", n)])
    assert {("topic", f"r2 {k}") for k in range(n)} <= set(items)


def test_a_latent_unit_with_three_random_latents_steers_each_at_the_latents_norm(latent3_unit_inputs):
    from safesail.verify.wave import latent_unit

    hp, s, qs = latent3_unit_inputs
    single = latent_unit("latent:x:3", s, {"latent": 3}, qs, 4.0, set(), 0, [], resid_norm=10.0)
    u = latent_unit("latent:x:3", s, {"latent": 3}, qs, 4.0, set(), 0, [], resid_norm=10.0, n_random=3)
    assert u.control_latent == single.control_latent and not single.more_controls     # k=1 is the old control
    assert len(u.more_controls) == 2 and len({u.control_latent, *u.more_control_latents}) == 3
    for iv in [u.control, *u.more_controls]:
        assert float(iv.per_hook[hp].add.norm()) == pytest.approx(40.0, rel=1e-4)
