"""Concept-contrastive query pairs: load and validate a pairs file.

A pairs file is JSON Lines, one pair a line:

    {"id": "pol-en-001", "domain": "politics", "concept": "election fraud", "lang": "en",
     "concept_query": "How do observers check an election for fraud?",
     "neutral_query": "How do observers check a bird census for errors?"}

`concept_query` carries a safety concept; `neutral_query` is the same query with the
concept swapped for a neutral one. `domain` is one of DOMAINS. Blank lines and lines
starting with `#` or `//` are skipped. Any problem raises a one-sentence UserError that
names the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safesail.domains import DOMAINS
from safesail.errors import UserError

REQUIRED_FIELDS: tuple[str, ...] = ("id", "domain", "concept", "lang", "concept_query", "neutral_query")
DEFAULT_PAIRS = "data/pairs/contrastive_pairs.jsonl"


@dataclass(frozen=True)
class Pair:
    id: str
    domain: str
    concept: str
    lang: str
    concept_query: str
    neutral_query: str


def repo_root() -> Path:
    """The source tree root (where `data/` and `configs/` live in an editable install)."""
    return Path(__file__).resolve().parents[2]


def resolve_data_path(path: str | Path | None, default: str | Path) -> Path:
    """A data file's path as given (or `default`): absolute, relative to the working directory, or to the
    source tree (the bundled data/)."""
    p = Path(path or default).expanduser()
    if p.is_absolute() or p.exists():
        return p
    bundled = repo_root() / p
    return bundled if bundled.exists() else p


def resolve_pairs_path(path: str | Path | None) -> Path:
    """A pairs path as given: absolute, relative to the working directory, or to the source tree."""
    return resolve_data_path(path, DEFAULT_PAIRS)


def _where(path: Path, lineno: int) -> str:
    return f"{path} line {lineno}"


def _parse_line(path: Path, lineno: int, line: str) -> Pair:
    where = _where(path, lineno)
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}); write one JSON object per line.") from None
    if not isinstance(rec, dict):
        raise UserError(f"{where} is not a JSON object; write one object per line with the fields "
                        f"{', '.join(REQUIRED_FIELDS)}.")
    missing = [k for k in REQUIRED_FIELDS if k not in rec or rec[k] is None]
    if missing:
        raise UserError(f"{where} lacks the field(s) {', '.join(missing)}; every pair needs "
                        f"{', '.join(REQUIRED_FIELDS)}.")
    bad_type = [k for k in REQUIRED_FIELDS if not isinstance(rec[k], (str, int)) or isinstance(rec[k], bool)]
    if bad_type:
        raise UserError(f"{where} has a non-text value in {', '.join(bad_type)}; give these fields as strings.")
    vals = {k: str(rec[k]).strip() for k in REQUIRED_FIELDS}
    if vals["domain"] not in DOMAINS:
        raise UserError(f"{where} has the unknown domain {vals['domain']!r}; use one of {', '.join(DOMAINS)}.")
    for k in ("concept_query", "neutral_query"):
        if not vals[k]:
            raise UserError(f"{where} has an empty {k}; give both queries of the pair as non-empty text.")
    for k in ("id", "concept", "lang"):
        if not vals[k]:
            raise UserError(f"{where} has an empty {k}; fill it in (lang is a code such as en, zh or hi).")
    if vals["concept_query"] == vals["neutral_query"]:
        raise UserError(f"{where} has identical concept and neutral queries; the neutral twin must swap the "
                        "concept for a neutral one.")
    return Pair(**vals)


def load_pairs(path: str | Path | None = None, domains: tuple[str, ...] | list[str] | None = None) -> list[Pair]:
    """Read and validate a pairs file; optionally keep only some domains.

    Raises UserError (one sentence, naming the line) for a missing file, bad JSON,
    missing fields, an unknown domain, an empty query or a duplicate id.
    """
    p = resolve_pairs_path(path)
    if not p.is_file():
        raise UserError(f"the pairs file {p} does not exist; point select.pairs at a JSONL file of "
                        "concept-contrastive pairs (see docs/selection.md).")
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    with open(p, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#") or line.startswith("//"):
                continue
            pair = _parse_line(p, lineno, line)
            if pair.id in seen:
                raise UserError(f"{_where(p, lineno)} repeats the id {pair.id!r} of line {seen[pair.id]}; "
                                "give every pair a unique id.")
            seen[pair.id] = lineno
            pairs.append(pair)
    if domains is not None:
        unknown = [d for d in domains if d not in DOMAINS]
        if unknown:
            raise UserError(f"select.domains names the unknown domain {unknown[0]!r}; use some of "
                            f"{', '.join(DOMAINS)}.")
        pairs = [q for q in pairs if q.domain in set(domains)]
    if not pairs:
        raise UserError(f"the pairs file {p} holds no pairs"
                        + (f" for the domains {', '.join(domains)}" if domains is not None else "")
                        + "; add pairs or point select.pairs at another file.")
    return pairs


def pair_domains(pairs: list[Pair]) -> list[str]:
    """The domains present, in the canonical DOMAINS order."""
    present = {q.domain for q in pairs}
    return [d for d in DOMAINS if d in present]
