"""Reading what the score and tag stages need: explanations, score segments, source windows.

All interpret files are append-only JSONL where the last record per (hook, latent)
wins; a torn last line (a run killed mid-write) is skipped.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

from safesail.errors import UserError
from safesail.rundir import RunDir

log = logging.getLogger(__name__)

# (segment record) -> (tokens of the segment's whole source window/query, offset of the segment in it)
WindowLookup = Callable[[dict], "tuple[list[str], int]"]


def iter_jsonl(path: Path) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON (a run killed mid-write?); skipped", path, n)
                continue
            if isinstance(rec, dict):
                yield rec


def last_per_latent(path: Path) -> dict[tuple[str, int], dict]:
    """The last record of each (hook, latent) in an append-only JSONL file."""
    out: dict[tuple[str, int], dict] = {}
    for rec in iter_jsonl(path):
        if "hook" in rec and "latent" in rec:
            out[(str(rec["hook"]), int(rec["latent"]))] = rec
    return out


def open_append(path: Path):
    """Open an append-only JSONL file, first ending a torn last line (a run killed mid-write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return open(path, "a", encoding="utf-8")


def append_jsonl(f, rec: dict) -> None:
    """Append one record to an open file and flush it (a crash loses at most this line)."""
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()


def load_explanations(rd: RunDir) -> dict[tuple[str, int], dict]:
    path = rd.interpret / "explanations.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `safesail explain` first.")
    recs = last_per_latent(path)
    if not recs:
        raise UserError(f"{path} holds no explanations; run `safesail explain` first.")
    return recs


def load_score_segments(rd: RunDir, hook: str) -> dict[int, list[dict]]:
    """The held-out (split "score") segments of every latent at `hook`, in file order."""
    path = rd.latents(hook) / "segments.jsonl"
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
