"""Example segments: short token windows around a latent's activations.

Sampling, as Safe-SAIL does it: the range `[0, max_act]` of a latent is cut
into `n_levels` equal intervals by linear interpolation; activating tokens
(act > 0) fall into level `l` when `edges[l] < act <= edges[l+1]`. From every
level a uniform random sample of centre tokens is kept while streaming
(`LevelReservoir`: each (latent, token) gets a random priority, each
(latent, level) keeps its smallest priorities, which is a uniform sample and
mergeable block by block). Random non-activating segments come from a pool of
uniformly drawn centre tokens, kept for a latent only when it is zero on the
whole segment.

Centres whose segments overlap an already accepted segment of the same latent
are skipped, then accepted segments are dealt alternately to the explain and
the score split, so the two splits never share a segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def level_of(acts: torch.Tensor, max_act: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Level 0..n_levels-1 of each activating value (acts > 0) given its latent's max."""
    scaled = acts / max_act.clamp_min(1e-12) * n_levels
    return torch.clamp(torch.ceil(scaled).long() - 1, 0, n_levels - 1)


class LevelReservoir:
    """Per (latent, level) a uniform sample of up to `size` activating tokens."""

    def __init__(self, m: int, n_levels: int, size: int, seed: int = 0):
        self.m, self.n_levels, self.size = int(m), int(n_levels), int(size)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.group = torch.empty(0, dtype=torch.int64)   # latent * n_levels + level
        self.token = torch.empty(0, dtype=torch.int64)   # global token index
        self.act = torch.empty(0)
        self.prio = torch.empty(0)

    def update(self, latent: torch.Tensor, level: torch.Tensor, token: torch.Tensor, act: torch.Tensor) -> None:
        if latent.numel() == 0:
            return
        prio = torch.rand(latent.numel(), generator=self.gen)
        group = torch.cat([self.group, latent.long() * self.n_levels + level.long()])
        token = torch.cat([self.token, token.long()])
        act = torch.cat([self.act, act.float()])
        prio = torch.cat([self.prio, prio])
        # Order by (group, priority) and keep the first `size` of every group.
        order = torch.argsort(prio, stable=True)
        order = order[torch.argsort(group[order], stable=True)]
        g = group[order]
        start = torch.searchsorted(g, g, right=False)
        rank = torch.arange(len(g)) - start
        keep = order[rank < self.size]
        self.group, self.token, self.act, self.prio = group[keep], token[keep], act[keep], prio[keep]

    def items(self, latent: int) -> list[tuple[int, int, float, float, int]]:
        """(level, token, act, priority, row) of one latent, highest level first, then by priority."""
        lo, hi = latent * self.n_levels, (latent + 1) * self.n_levels
        a = int(torch.searchsorted(self.group, lo))
        b = int(torch.searchsorted(self.group, hi))
        rows = [(int(g) - lo, int(t), float(v), float(p), a + i) for i, (g, t, v, p) in
                enumerate(zip(self.group[a:b].tolist(), self.token[a:b].tolist(), self.act[a:b].tolist(),
                              self.prio[a:b].tolist()))]
        rows.sort(key=lambda r: (-r[0], r[3]))
        return rows


@dataclass
class SegmentSpec:
    """Where a segment lies: window row, first and last+1 column, and its centre token."""
    latent: int           # latent id
    kind: str             # activating | random
    level: int | None
    window: int
    start: int
    stop: int
    center: int           # global token index of the centre
    split: str = ""


def segment_span(doc_row: list[int], col: int, seg_len: int, left_frac: float) -> tuple[int, int]:
    """[start, stop) of a segment of up to `seg_len` tokens around column `col`, inside the
    window and inside the centre token's document (`doc_row` = doc id per column)."""
    n = len(doc_row)
    doc = doc_row[col]
    lo, hi = col, col + 1
    while lo > 0 and doc_row[lo - 1] == doc:
        lo -= 1
    while hi < n and doc_row[hi] == doc:
        hi += 1
    before = int(round((seg_len - 1) * left_frac))
    start = max(lo, col - before)
    stop = min(hi, start + seg_len)
    start = max(lo, stop - seg_len)
    return start, stop


def deal_splits(specs: list[SegmentSpec], n_explain: int, n_score: int,
                taken: dict[int, list[tuple[int, int]]] | None = None) -> list[SegmentSpec]:
    """Accept non-overlapping segments in order and deal them alternately to explain and score.

    `taken` (window -> accepted spans) carries the segments accepted earlier (other levels)."""
    taken = {} if taken is None else taken
    out: list[SegmentSpec] = []
    counts = {"explain": 0, "score": 0}
    caps = {"explain": n_explain, "score": n_score}
    turn = "explain"
    for s in specs:
        if counts["explain"] >= n_explain and counts["score"] >= n_score:
            break
        spans = taken.setdefault(s.window, [])
        if any(s.start < b and a < s.stop for a, b in spans):
            continue
        if counts[turn] >= caps[turn]:
            turn = "score" if turn == "explain" else "explain"
        s.split = turn
        counts[turn] += 1
        spans.append((s.start, s.stop))
        out.append(s)
        turn = "score" if turn == "explain" else "explain"
    return out


def segment_record(hook: str, latent: int, segment_id: int, spec: SegmentSpec, doc_id: int, token_ids: list[int],
                   tokens: list[str], acts: list[float]) -> dict:
    return {"hook": hook, "latent": int(latent), "segment_id": int(segment_id), "split": spec.split,
            "kind": spec.kind, "level": spec.level, "doc_id": int(doc_id), "start": int(spec.start),
            "token_ids": [int(t) for t in token_ids], "tokens": tokens,
            "acts": [round(float(a), 6) for a in acts]}


def load_segments(path, latent: int | None = None, split: str | None = None) -> list[dict]:
    """Read `segments.jsonl`, optionally only one latent and/or one split."""
    import json

    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if latent is not None and rec["latent"] != latent:
                continue
            if split is not None and rec["split"] != split:
                continue
            out.append(rec)
    return out
