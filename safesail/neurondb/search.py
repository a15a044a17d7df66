"""Searching the neuron DB: explanation text, safety domain, a score range of one scorer kind, layer.

Text is matched word by word, every word must occur:
- ordinary words go to FTS5 over the primary explanations (`word*` = prefix);
- words with CJK characters are matched as substrings of any language's explanation
  (unicode61 keeps a run of CJK characters as one token, so FTS cannot find words inside it);
- words with no letter or digit at all (`***`, Safe-SAIL's masked politics explanations,
  or `*`) are matched as substrings too: FTS5 drops punctuation, so they have no tokens.
"""

from __future__ import annotations

import json
import re

from safesail.neurondb.rows import DEFAULT_KIND

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def _like(word: str) -> str:
    return "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def split_words(text: str) -> tuple[list[str], list[str]]:
    """(FTS5 terms, substring words) of a search text."""
    fts, sub = [], []
    for w in text.split():
        if _CJK.search(w) or not any(ch.isalnum() for ch in w):
            sub.append(w)
            continue
        prefix = w.endswith("*")
        w = w.rstrip("*").replace('"', '""')
        fts.append(f'"{w}"' + ("*" if prefix else ""))
    return fts, sub


def search_sql(text: str | None = None, domain: str | None = None, min_score: float | None = None,
               max_score: float | None = None, layer: int | None = None, limit: int = 50,
               kind: str = DEFAULT_KIND) -> tuple[str, list]:
    where: list[str] = []
    params: list = [kind]
    source = "latents l"
    order = "s.value IS NULL, s.value DESC, l.layer, l.idx"
    fts, sub = split_words(text or "")
    if fts:
        source = "explanations_fts f JOIN latents l ON l.id = f.rowid"
        where.append("explanations_fts MATCH ?")
        order = "f.rank, " + order
    sql = (f"SELECT l.hook, l.layer, l.idx, e.text, s.value, t.tag_list FROM {source} "
           "LEFT JOIN explanations e ON e.latent_id = l.id "
           "LEFT JOIN scores s ON s.latent_id = l.id AND s.kind = ? "
           "LEFT JOIN tag_records t ON t.latent_id = l.id ")
    # the kind parameter of the join comes before the MATCH parameter in the statement
    if fts:
        params.append(" ".join(fts))
    for w in sub:
        where.append("EXISTS (SELECT 1 FROM explanation_langs x WHERE x.latent_id = l.id "
                     "AND x.text LIKE ? ESCAPE '\\')")
        params.append(_like(w))
    if domain:
        if domain == "general":
            where.append("NOT EXISTS (SELECT 1 FROM tags g WHERE g.latent_id = l.id)")
            where.append("e.latent_id IS NOT NULL")
        else:
            where.append("EXISTS (SELECT 1 FROM tags g WHERE g.latent_id = l.id AND g.domain = ?)")
            params.append(domain)
    if min_score is not None:
        where.append("s.value >= ?")
        params.append(float(min_score))
    if max_score is not None:
        where.append("s.value <= ?")
        params.append(float(max_score))
    if layer is not None:
        where.append("l.layer = ?")
        params.append(int(layer))
    if not where:
        where.append("e.latent_id IS NOT NULL")
    sql += "WHERE " + " AND ".join(where) + f" ORDER BY {order} LIMIT ?"
    params.append(int(limit))
    return sql, params


def rows_to_hits(rows, kind: str) -> list[dict]:
    return [{"hook": r[0], "layer": r[1], "index": r[2], "explanation": r[3], "score": r[4], "kind": kind,
             "tags": json.loads(r[5]) if r[5] else []} for r in rows]
