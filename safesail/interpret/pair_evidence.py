"""Pair evidence for a safety tag: does a latent fire on a domain's concept queries more than on their twins?

The select stage measures, per latent and domain over that domain's n pairs, the share of
pairs where the latent fires on the concept query but not on its neutral twin (d) and the
reverse (r) (`safesail/train/contrastive.py`). Those are the discordant pairs of a paired
design, so the right test is McNemar's, exact: with b = d*n and c = r*n discordant pairs,
under "no difference" each discordant pair goes either way with probability 1/2, and the
one-sided p-value is P(Binomial(b + c, 1/2) >= b). The effect size is the paired rate
difference concept_rate - neutral_rate (= d - r), reported with Cohen's h of the two rates.

A domain passes when p <= alpha, the rate difference >= min_rate_diff, the concept rate
>= min_concept_rate and the mean (concept - neutral) max activation > min_act_diff.
The p-value is per latent and domain, and the explained latents were chosen on the same
pairs (select's candidates), so it is optimistic; `benchmarks/bench_tag_rule.py` measures
the tags on held-out pairs instead.
"""

from __future__ import annotations

import math

DEFAULTS = {"alpha": 0.01, "min_concept_rate": 0.2, "min_rate_diff": 0.15, "min_act_diff": 0.0}


def binom_sf_half(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exact (n is at most a few hundred pairs)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    total = sum(math.comb(n, i) for i in range(k, n + 1))
    return min(1.0, total / 2.0 ** n)


def mcnemar_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that concept-only firing (b) outnumbers twin-only firing (c)."""
    return binom_sf_half(b, b + c)


def cohen_h(p1: float, p2: float) -> float:
    """Cohen's h between two proportions (0.2 small, 0.5 medium, 0.8 large)."""
    clip = lambda p: min(1.0, max(0.0, p))  # noqa: E731
    return 2 * math.asin(math.sqrt(clip(p1))) - 2 * math.asin(math.sqrt(clip(p2)))


def domain_evidence(concept_rate: float, neutral_rate: float, distinguish: float, reverse: float,
                    mean_act_diff: float, n_pairs: int, s: dict) -> dict:
    """One latent's evidence for one domain, with its test, effect size and whether it passes."""
    b = int(round(distinguish * n_pairs))
    c = int(round(reverse * n_pairs))
    p = mcnemar_p(b, c)
    effect = concept_rate - neutral_rate
    alpha = float(s.get("alpha", DEFAULTS["alpha"]))
    passes = (p <= alpha and effect >= float(s.get("min_rate_diff", DEFAULTS["min_rate_diff"]))
              and concept_rate >= float(s.get("min_concept_rate", DEFAULTS["min_concept_rate"]))
              and mean_act_diff > float(s.get("min_act_diff", DEFAULTS["min_act_diff"])))
    return {"concept_rate": round(concept_rate, 4), "neutral_rate": round(neutral_rate, 4),
            "mean_act_diff": round(mean_act_diff, 5), "n_pairs": int(n_pairs), "concept_only": b, "neutral_only": c,
            "p_value": float(f"{p:.3g}"), "effect": round(effect, 4), "cohen_h": round(cohen_h(concept_rate,
                                                                                              neutral_rate), 4),
            "passes": bool(passes)}


def latent_evidence(stats: dict, row: int, n_pairs: dict[str, int], domains, s: dict) -> dict:
    """Per domain with pair statistics: `domain_evidence` of the latent at `row` of select's tensors."""
    out = {}
    for d in domains:
        if f"{d}.concept_rate" not in stats or not n_pairs.get(d):
            continue
        g = lambda name: float(stats[f"{d}.{name}"][row])  # noqa: E731
        out[d] = domain_evidence(g("concept_rate"), g("neutral_rate"), g("distinguish_rate"), g("reverse_rate"),
                                 g("mean_act_diff"), int(n_pairs[d]), s)
    return out
