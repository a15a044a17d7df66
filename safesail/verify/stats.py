"""The sufficiency statistic and its pre-registered criterion (docs/verify.md, "Sufficiency").

The judge gives each answer a graded p(yes) ("is this text about <topic>?"). Per neutral query the
steered answer is compared with the random latent's answer (same norm) and with the unsteered one
by the **difference of the judge's log-odds**, logit p_steered - logit p_other: the judge's own
evidence in nats, so an answer moving from p 0.01 to 0.05 counts as much as one moving from 0.2 to
0.55 (a difference of probabilities lets the few answers with a high p(yes) decide; a win count
throws the size of each difference away). The criterion, fixed before the session-4 demo run:

    a latent **steers on-concept** when the 95% interval (seeded percentile bootstrap over queries)
    of its mean log-odds difference against the random latent lies above 0;

read beside the same statistic against the unsteered answer (a random latent at the same norm can
break its answers more than the latent does). A paired t interval is reported beside the bootstrap
one (`t_low`, `t_high`).
"""

from __future__ import annotations

import math
from statistics import NormalDist

P_CLIP = 1e-6          # p(yes) is clipped to [P_CLIP, 1 - P_CLIP] before the logit (a text reply gives 0 or 1)
CRITERION_METRIC = "p_yes_logodds_vs_random"
STRICT_METRIC = "p_yes_logodds_vs_unsteered"


def logit(p: float) -> float:
    p = min(1 - P_CLIP, max(P_CLIP, float(p)))
    return math.log(p / (1 - p))


def logodds_diffs(a: list[float | None], b: list[float | None]) -> list[float]:
    """Per pair logit(a) - logit(b); pairs with an unusable reply (None) left out."""
    return [logit(x) - logit(y) for x, y in zip(a, b) if x is not None and y is not None]


_T95 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646}   # two-sided 95%


def t_quantile(level: float, df: int) -> float:
    """Two-sided Student t quantile (e.g. 1.96 -> 2.20 at 11 df): the table for 95% below 8 df, else the
    Cornish-Fisher expansion (within 5e-4 of the exact value for df >= 8)."""
    df = max(int(df), 1)
    if abs(level - 0.95) < 1e-9 and df in _T95:
        return _T95[df]
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))




def t_interval(values: list[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """Paired t interval of the mean (None, None for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return None, None
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    h = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return m - h, m + h


def steers_on_concept(records: list[dict], metric: str = CRITERION_METRIC) -> bool | None:
    """The pre-registered verdict of one latent from its sufficiency records (dicts of effects.jsonl):
    True when `metric`'s interval lies above 0, False when it does not, None when it was not measured."""
    for r in records:
        if r.get("check") == "sufficiency" and r.get("metric") == metric and r.get("target") != "random_latent":
            lo = r.get("ci_low")
            return None if lo is None else bool(lo > 0)
    return None
