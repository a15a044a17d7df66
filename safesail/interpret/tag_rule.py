"""Measuring a tag rule on the bundled pairs: precision and recall of each domain against the pair labels.

The question a tag answers on the diagnose page is "this query touches domain d" whenever a
latent tagged d fires on it. So a rule is measured at the level of queries: for domain d,
a query is predicted d when any latent the rule tagged d fires on it; the positives are the
concept queries of d's pairs, the negatives every other query (all neutral twins and the
other domains' concept queries). Pair evidence must not be measured on the pairs it was
computed from: `two_fold` splits the pairs in halves by a hash of their ids, derives the pair
evidence on one half, measures on the other, and sums both directions. The LLM evidence
(from the explanation) does not depend on the pairs and is used as recorded.

Pure tensor code: `benchmarks/bench_tag_rule.py` feeds it a real run's tables.
"""

from __future__ import annotations

import hashlib

import torch

from safesail.interpret import pair_evidence as pe
from safesail.interpret.tag import DOMAINS, RULES, combine
from safesail.train import contrastive as C


def fold_of(pair_id: str) -> int:
    """0 or 1, stable across runs and machines."""
    return hashlib.sha1(pair_id.encode("utf-8")).digest()[0] & 1


def evidence_from_rows(cmax: torch.Tensor, nmax: torch.Tensor, domains: list[str], rows: torch.Tensor,
                       scale: torch.Tensor, threshold: float, s: dict) -> list[dict]:
    """Per latent (column), the pair evidence of the pairs in `rows` only."""
    sub = [d for d, keep in zip(domains, rows.tolist()) if keep]
    stats = C.contrast_stats(cmax[rows], nmax[rows], sub, threshold, scale=scale, domain_order=list(DOMAINS))
    t = C.stats_tensors(stats)
    n_pairs = {d: stats.n_pairs[d] for d in stats.domains}
    return [pe.latent_evidence(t, j, n_pairs, DOMAINS, s) for j in range(cmax.shape[1])]


def tags_under(rule: str, llm: list[dict | None], pairs: list[dict | None]) -> list[list[str]]:
    """Each latent's tags under `rule` from its LLM evidence and pair evidence."""
    return [combine(a, b, rule)[0] for a, b in zip(llm, pairs)]


def count(tags: list[list[str]], fire_c: torch.Tensor, fire_n: torch.Tensor, domains: list[str],
          rows: torch.Tensor) -> dict[str, dict]:
    """Query-level TP / FP / FN per domain over the pairs in `rows` (fire_*: [P, L] bool)."""
    out = {}
    label = [d for d, keep in zip(domains, rows.tolist()) if keep]
    fc, fn = fire_c[rows], fire_n[rows]
    for d in DOMAINS:
        cols = [j for j, t in enumerate(tags) if d in t]
        pc = fc[:, cols].any(1) if cols else torch.zeros(fc.shape[0], dtype=torch.bool)
        pn = fn[:, cols].any(1) if cols else torch.zeros(fn.shape[0], dtype=torch.bool)
        pos = torch.tensor([x == d for x in label], dtype=torch.bool)
        tp = int((pc & pos).sum())
        out[d] = {"tp": tp, "fp": int((pc & ~pos).sum()) + int(pn.sum()), "fn": int(pos.sum()) - tp,
                  "latents": len(cols)}
    return out


def finish(counts: dict[str, dict]) -> dict[str, dict]:
    """Precision, recall and F1 from summed counts (precision None when nothing was predicted)."""
    out = {}
    for d, c in counts.items():
        pred = c["tp"] + c["fp"]
        prec = c["tp"] / pred if pred else None
        rec = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else None
        f1 = (2 * prec * rec / (prec + rec) if prec and rec else 0.0)
        out[d] = {**c, "precision": None if prec is None else round(prec, 4),
                  "recall": None if rec is None else round(rec, 4), "f1": round(f1, 4)}
    return out


def two_fold(cmax: torch.Tensor, nmax: torch.Tensor, pair_ids: list[str], domains: list[str],
             llm: list[dict | None], threshold: float, s: dict, rules=RULES) -> dict[str, dict]:
    """Per rule: per-domain precision/recall/F1 on held-out pairs, and the macro F1 over domains.

    cmax, nmax: [P, L] query-level max activations of the L latents on the concept / neutral queries;
    llm: per latent its recorded LLM evidence (None: not asked)."""
    folds = torch.tensor([fold_of(i) for i in pair_ids])
    scale = C.latent_scale(cmax, nmax)
    fire_c, fire_n = C.fires(cmax, scale, threshold), C.fires(nmax, scale, threshold)
    summed: dict[str, dict] = {r: {d: {"tp": 0, "fp": 0, "fn": 0, "latents": 0} for d in DOMAINS} for r in rules}
    for k in (0, 1):
        fit, test = folds != k, folds == k
        pairs_ev = evidence_from_rows(cmax, nmax, domains, fit, scale, threshold, s)
        for r in rules:
            c = count(tags_under(r, llm, pairs_ev), fire_c, fire_n, domains, test)
            for d in DOMAINS:
                for key in ("tp", "fp", "fn"):
                    summed[r][d][key] += c[d][key]
                summed[r][d]["latents"] += c[d]["latents"]
    out = {}
    for r in rules:
        for d in DOMAINS:
            summed[r][d]["latents"] /= 2    # mean over the two folds
        per = finish(summed[r])
        out[r] = {"domains": per, "macro_f1": round(sum(v["f1"] for v in per.values()) / len(per), 4)}
    return out


def choose(measured: dict[str, dict]) -> str:
    """The rule with the best macro F1; ties go to the one with the better mean precision."""
    def key(r):
        precs = [v["precision"] or 0.0 for v in measured[r]["domains"].values()]
        return (measured[r]["macro_f1"], sum(precs) / len(precs))
    return max(measured, key=key)
