"""Language comparison: the same query in 2-3 languages, which safety latents they share.

Per domain (or 'general' for untagged latents) and layer: the latents every
language uses, those only one language uses, and those some but not all use.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from safesail.diagnose.engine import Annotated, _keep
from safesail.diagnose.schemas import DOMAINS, CompareGroup, CompareLatent, Filters

LANG_NAMES = {"en": "English", "zh": "Chinese", "hi": "Hindi"}


def latent_maxima(a: Annotated, scope: str, filters: Filters) -> dict[int, float]:
    """Column -> strongest normalized activation over the chosen tokens, for latents passing the filters."""
    rows = [i for i, r in enumerate(a.roles) if (scope == "all" and r in ("query", "answer")) or r == scope]
    if not rows:
        return {}
    best = a.norm[torch.tensor(rows)].max(0).values
    out = {}
    for c in (best > filters.min_norm).nonzero().flatten().tolist():
        row = a.info.get(c)
        if row is not None and _keep(row, filters):
            out[c] = float(best[c])
    return out


def compare_annotated(per_lang: dict[str, Annotated], scope: str, filters: Filters
                      ) -> tuple[list[CompareGroup], dict[str, dict[str, int]]]:
    langs = list(per_lang)
    maxima = {lang: latent_maxima(a, scope, filters) for lang, a in per_lang.items()}
    any_a = next(iter(per_lang.values()))
    info: dict[int, dict] = {}
    for a in per_lang.values():
        info.update(a.info)
    groups: dict[tuple[str, int], dict] = defaultdict(lambda: {"shared": [], "unique": defaultdict(list), "partial": []})
    summary: dict[str, dict[str, int]] = {}
    all_cols = sorted(set().union(*[set(m) for m in maxima.values()]))
    for c in all_cols:
        row = info[c]
        users = [lang for lang in langs if c in maxima[lang]]
        layer, index = int(any_a.col_layer[c]), int(any_a.col_index[c])
        domains = [t for t in (row.get("tags") or []) if t in DOMAINS] or ["general"]
        lat = CompareLatent(neuron_id=f"{layer}_{index}", layer=layer, index=index, explanation=row.get("explanation"),
                            score=row.get("score"), tags=list(row.get("tags") or []),
                            max_norm={lang: maxima[lang][c] for lang in users})
        for d in domains:
            g = groups[(d, layer)]
            s = summary.setdefault(d, {"shared": 0, **{lang: 0 for lang in langs}, "partial": 0})
            if len(users) == len(langs):
                g["shared"].append(lat)
                s["shared"] += 1
            elif len(users) == 1:
                g["unique"][users[0]].append(lat)
                s[users[0]] += 1
            else:
                g["partial"].append(lat)
                s["partial"] += 1

    def strength(lat: CompareLatent) -> float:
        return -max(lat.max_norm.values())

    order = {d: i for i, d in enumerate((*DOMAINS, "general"))}
    out = []
    for (d, layer), g in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        out.append(CompareGroup(domain=d, layer=layer, shared=sorted(g["shared"], key=strength),
                                unique={lang: sorted(g["unique"].get(lang, []), key=strength) for lang in langs},
                                partial=sorted(g["partial"], key=strength)))
    summary = {d: summary[d] for d in sorted(summary, key=lambda d: order[d])}
    return out, summary
