"""Reading what the score and tag stages need: explanations, score segments, source windows.

All interpret files are append-only JSONL where the last record per (hook, latent)
wins; a torn last line (a run killed mid-write) is skipped.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

from safesail.errors import UserError
from safesail.jsonl import iter_jsonl, last_per_latent
from safesail.rundir import RunDir

log = logging.getLogger(__name__)

# (segment record) -> (tokens of the segment's whole source window/query, offset of the segment in it)
WindowLookup = Callable[[dict], "tuple[list[str], int]"]


def load_explanations(rd: RunDir) -> dict[tuple[str, int], dict]:
    path = rd.explanations_file
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `safesail explain` first.")
    recs = last_per_latent(path)
    if not recs:
        raise UserError(f"{path} holds no explanations; run `safesail explain` first.")
    return recs


def load_score_segments(rd: RunDir, hook: str) -> dict[int, list[dict]]:
    """The held-out (split "score") segments of every latent at `hook`, in file order."""
    path = rd.latent_segments(hook)
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `safesail collect` first.")
    out: dict[int, list[dict]] = defaultdict(list)
    for rec in iter_jsonl(path):
        if rec.get("split") == "score":
            out[int(rec["latent"])].append(rec)
    return dict(out)


def explanation_key(rec: dict) -> str:
    """What identifies the explanation a score or tag was made for."""
    import hashlib

    text = f"{rec.get('status')}\x00{rec.get('explanation')}\x00{rec.get('model')}\x00{rec.get('prompt_version')}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
