"""Concept-contrastive metrics: how well an SAE's latents tell a concept query from its neutral twin.

Pure tensor code, no model and no files; the definitions are written out in
docs/selection.md. In short, for latent j and query q:

    a_j(q)    = max over the query's tokens of the latent's code          (query_max)
    s_j       = max over every query of the pairs set of a_j(q)           (latent_scale)
    fire_j(q) = a_j(q) > 0 and a_j(q) > tau * s_j                         (fires)

and for a group G of pairs (one domain, or all pairs):

    d_j = mean_{i in G} fire_j(c_i) * (1 - fire_j(n_i))   fires on the concept, not on the twin
    r_j = mean_{i in G} fire_j(n_i) * (1 - fire_j(c_i))   the reverse
    f_j = max(d_j - r_j, 0)    (or d_j when the chance correction is off)
    L0,t   = #{ j : f_j >= t }
    I_CDF  = mean_j f_j  = integral_0^1 L0,t / n_latents dt

Swapped-word figures (which latents see the concept words themselves): a token of a query is
*swapped* when its id does not occur in the pair's other query (the concept words in c_i, the
neutral words in n_i); the rest are *shared*. With a_j^w(q) and a_j^s(q) the maxima over q's
swapped and shared tokens, fired against the same tau * s_j:

    word_rate_j    = mean_{i in G} fire(a^w_j(c_i))    fires on the concept's own words
    word_reverse_j = mean_{i in G} fire(a^w_j(n_i))    fires on the twin's swapped-in words
    shared_rate_j  = mean over all 2P queries of fire(a^s_j(q))   fires on words both share (breadth)
    word_score_j   = word_rate_j - word_reverse_j - shared_rate_j   (select.candidate_rank=word)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

ALL = "all"


def query_max(codes: torch.Tensor, query_index: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Per query and latent, the largest code over the query's tokens: [T, N] -> [n_queries, N].

    `query_index[t]` is the query that token t belongs to. Codes are nonnegative, so a
    query none of whose tokens fires a latent gets 0.
    """
    out = torch.zeros(n_queries, codes.shape[1], dtype=codes.dtype, device=codes.device)
    with warnings.catch_warnings():   # index_reduce_ is "beta"; it is ~5x faster than scatter_reduce_ on CPU
        warnings.simplefilter("ignore", UserWarning)
        return out.index_reduce_(0, query_index.to(codes.device).long(), codes, "amax", include_self=True)


def latent_scale(*query_maxes: torch.Tensor) -> torch.Tensor:
    """s_j: each latent's largest query-level activation over all the given tables."""
    return torch.cat([q for q in query_maxes], dim=0).amax(dim=0)


def fires(qmax: torch.Tensor, scale: torch.Tensor, threshold: float) -> torch.Tensor:
    """Query-level firing: above `threshold` times the latent's scale, and nonzero."""
    return (qmax > 0) & (qmax > threshold * scale.unsqueeze(0))


@dataclass
class ContrastStats:
    """Per-latent figures for each group of pairs (each domain, and ALL)."""

    groups: list[str]
    n_pairs: dict[str, int] = field(default_factory=dict)
    concept_rate: dict[str, torch.Tensor] = field(default_factory=dict)   # P(fire on concept)
    neutral_rate: dict[str, torch.Tensor] = field(default_factory=dict)   # P(fire on twin)
    distinguish: dict[str, torch.Tensor] = field(default_factory=dict)    # d_j
    reverse: dict[str, torch.Tensor] = field(default_factory=dict)        # r_j
    freq: dict[str, torch.Tensor] = field(default_factory=dict)           # f_j
    mean_act_diff: dict[str, torch.Tensor] = field(default_factory=dict)  # mean a_j(c) - a_j(n)
    word_rate: dict[str, torch.Tensor] = field(default_factory=dict)      # fires on the concept's swapped words
    word_reverse: dict[str, torch.Tensor] = field(default_factory=dict)   # fires on the twin's swapped words
    shared_rate: dict[str, torch.Tensor] = field(default_factory=dict)    # fires on shared words (all queries)
    word_score: dict[str, torch.Tensor] = field(default_factory=dict)     # word_rate - word_reverse - shared_rate

    @property
    def domains(self) -> list[str]:
        return [g for g in self.groups if g != ALL]

    @property
    def n_latents(self) -> int:
        return int(next(iter(self.freq.values())).numel())


def swapped_mask(query_index: torch.Tensor, token_ids: torch.Tensor, n_queries: int) -> torch.Tensor:
    """[T] bool: token t of query q is swapped when its id does not occur in q's twin (q xor 1:
    queries 2i and 2i+1 are pair i's concept query and neutral twin)."""
    qi, ids = query_index.long().tolist(), token_ids.long().tolist()
    per_query: list[set[int]] = [set() for _ in range(n_queries)]
    for q, x in zip(qi, ids):
        per_query[q].add(x)
    return torch.tensor([x not in per_query[q ^ 1] for q, x in zip(qi, ids)], dtype=torch.bool)


def contrast_stats(concept_max: torch.Tensor, neutral_max: torch.Tensor, pair_domains: list[str],
                   threshold: float, correct_for_chance: bool = True,
                   scale: torch.Tensor | None = None, domain_order: list[str] | None = None,
                   words: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                   ) -> ContrastStats:
    """Figures of every latent from query-level activations of the concept and neutral queries.

    concept_max, neutral_max: [P, N] (row i = pair i); pair_domains: the P pairs' domains.
    words: optionally the same maxima over swapped and shared tokens only, (concept swapped, neutral
    swapped, concept shared, neutral shared), for the swapped-word figures.
    """
    if concept_max.shape != neutral_max.shape:
        raise ValueError(f"concept and neutral tables differ in shape: {tuple(concept_max.shape)} "
                         f"vs {tuple(neutral_max.shape)}")
    if len(pair_domains) != concept_max.shape[0]:
        raise ValueError("pair_domains must list one domain per row")
    cmax = concept_max.float()
    nmax = neutral_max.float()
    if scale is None:
        scale = latent_scale(cmax, nmax)
    fc = fires(cmax, scale, threshold).float()
    fn = fires(nmax, scale, threshold).float()
    order = domain_order or sorted(set(pair_domains))
    present = [d for d in order if d in set(pair_domains)]
    stats = ContrastStats(groups=present + [ALL])
    for g in stats.groups:
        rows = torch.tensor([g == ALL or d == g for d in pair_domains], device=cmax.device)
        c, n = fc[rows], fn[rows]
        stats.n_pairs[g] = int(rows.sum())
        stats.concept_rate[g] = c.mean(0)
        stats.neutral_rate[g] = n.mean(0)
        d = (c * (1 - n)).mean(0)
        r = (n * (1 - c)).mean(0)
        stats.distinguish[g] = d
        stats.reverse[g] = r
        stats.freq[g] = (d - r).clamp_min(0) if correct_for_chance else d
        stats.mean_act_diff[g] = (cmax[rows] - nmax[rows]).mean(0)
    if words is not None:
        cw, nw, cs, ns = (fires(w.float(), scale, threshold).float() for w in words)
        shared = torch.cat([cs, ns]).mean(0)
        for g in stats.groups:
            rows = torch.tensor([g == ALL or d == g for d in pair_domains], device=cmax.device)
            stats.word_rate[g] = cw[rows].mean(0)
            stats.word_reverse[g] = nw[rows].mean(0)
            stats.shared_rate[g] = shared.clone()   # one tensor per group: safetensors refuses shared memory
            stats.word_score[g] = stats.word_rate[g] - stats.word_reverse[g] - shared
    return stats


def t_key(t: float) -> str:
    """The JSON key of a threshold: 0.1 -> "0.1"."""
    return f"{float(t):g}"


def l0_t(freq: torch.Tensor, t_grid: list[float]) -> dict[str, int]:
    """L0,t: how many latents reach distinguishing frequency t, for each t of the grid."""
    return {t_key(t): int((freq >= float(t)).sum()) for t in t_grid}


def i_cdf(freq: torch.Tensor) -> float:
    """I_CDF: the expected distinguishing frequency of a latent (the area under L0,t / n_latents)."""
    return float(freq.float().mean()) if freq.numel() else 0.0


def sae_figures(stats: ContrastStats, t_grid: list[float]) -> dict:
    """The SAE-level figures: per group {n_pairs, i_cdf, l0}, plus the macro average over domains."""
    out: dict = {}
    for g in stats.groups:
        out[g] = {"n_pairs": stats.n_pairs[g], "i_cdf": i_cdf(stats.freq[g]), "l0": l0_t(stats.freq[g], t_grid),
                  "i_cdf_uncorrected": i_cdf(stats.distinguish[g])}
    doms = stats.domains
    if doms:
        out["macro"] = {
            "i_cdf": sum(out[d]["i_cdf"] for d in doms) / len(doms),
            "l0": {k: sum(out[d]["l0"][k] for d in doms) / len(doms) for k in out[doms[0]]["l0"]},
            "i_cdf_uncorrected": sum(out[d]["i_cdf_uncorrected"] for d in doms) / len(doms),
        }
    return out


RANKS = ("word", "freq")


def top_latents(stats: ContrastStats, group: str, n: int, min_freq: float, rank: str = "freq") -> list[dict]:
    """A group's best candidate latents, at most n, each with its figures and `score` (the ranking value).

    rank="freq": by the distinguishing frequency f_j (ties: larger mean activation gap), f_j >= min_freq.
    rank="word": by word_score_j (ties: larger f_j), among the latents with word_score_j >= min_freq or
    f_j >= min_freq (so a model whose latents never fire on the concept words alone, such as a random
    SAE, still gets the freq candidates, after every word one); needs the swapped-word figures (falls
    back to freq when they were not computed).
    """
    f = stats.freq[group]
    diff = stats.mean_act_diff[group]
    by_word = rank == "word" and group in stats.word_score
    score = stats.word_score[group] if by_word else f
    ok = (f >= min_freq) & (f > 0)
    if by_word:
        ok |= (score >= min_freq) & (score > 0)
    keep = torch.nonzero(ok).flatten().tolist()
    keep.sort(key=lambda j: (-float(score[j]), -float(f[j]), -float(diff[j]), j))
    out = []
    for j in keep[:n]:
        row = {"latent": int(j), "freq": round(float(f[j]), 4),
               "concept_rate": round(float(stats.concept_rate[group][j]), 4),
               "neutral_rate": round(float(stats.neutral_rate[group][j]), 4),
               "mean_act_diff": round(float(diff[j]), 5), "score": round(float(score[j]), 4)}
        if group in stats.word_score:
            row.update({"word_rate": round(float(stats.word_rate[group][j]), 4),
                        "word_reverse_rate": round(float(stats.word_reverse[group][j]), 4),
                        "shared_rate": round(float(stats.shared_rate[group][j]), 4)})
        out.append(row)
    return out


def stats_tensors(stats: ContrastStats) -> dict[str, torch.Tensor]:
    """Flat `{group}.{name}` tensors for a safetensors file (see docs/selection.md)."""
    out: dict[str, torch.Tensor] = {}
    for g in stats.groups:
        out[f"{g}.concept_rate"] = stats.concept_rate[g]
        out[f"{g}.neutral_rate"] = stats.neutral_rate[g]
        out[f"{g}.distinguish_rate"] = stats.distinguish[g]
        out[f"{g}.reverse_rate"] = stats.reverse[g]
        out[f"{g}.freq"] = stats.freq[g]
        out[f"{g}.mean_act_diff"] = stats.mean_act_diff[g]
        if g in stats.word_score:
            out[f"{g}.word_rate"] = stats.word_rate[g]
            out[f"{g}.word_reverse_rate"] = stats.word_reverse[g]
            out[f"{g}.shared_rate"] = stats.shared_rate[g]
            out[f"{g}.word_score"] = stats.word_score[g]
    out["latent_ids"] = torch.arange(stats.n_latents, dtype=torch.int64)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def stats_from_tensors(tensors: dict[str, torch.Tensor]) -> ContrastStats:
    """Inverse of stats_tensors."""
    from safesail.train.pairs import DOMAINS

    names = {k.split(".", 1)[0] for k in tensors if k != "latent_ids"}
    groups = [d for d in DOMAINS if d in names] + sorted(names - set(DOMAINS) - {ALL}) + [ALL] * (ALL in names)
    s = ContrastStats(groups=groups)
    for g in groups:
        s.concept_rate[g] = tensors[f"{g}.concept_rate"]
        s.neutral_rate[g] = tensors[f"{g}.neutral_rate"]
        s.distinguish[g] = tensors[f"{g}.distinguish_rate"]
        s.reverse[g] = tensors[f"{g}.reverse_rate"]
        s.freq[g] = tensors[f"{g}.freq"]
        s.mean_act_diff[g] = tensors[f"{g}.mean_act_diff"]
        if f"{g}.word_score" in tensors:
            s.word_rate[g] = tensors[f"{g}.word_rate"]
            s.word_reverse[g] = tensors[f"{g}.word_reverse_rate"]
            s.shared_rate[g] = tensors[f"{g}.shared_rate"]
            s.word_score[g] = tensors[f"{g}.word_score"]
    return s
