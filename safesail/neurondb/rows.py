"""How one interpret record becomes neuron-DB rows: explanations (per language), scores (per kind), tags.

Shared by `db build` (records from a run's JSONL files) and `db import` (Safe-SAIL's
release entries), so both fill the v3 tables the same way.
"""

from __future__ import annotations

import json
import math

# The score record's fields that have a column of their own (docs/neuron-db.md, table `scores`).
SCORE_COLUMNS = ("value", "ci_low", "ci_high", "control_shuffled", "control_constant", "beats_shuffled",
                 "n_examples", "llm_calls", "prompt_tokens", "completion_tokens", "status", "failure")
# Fields that say which latent a record is about; neither a column nor part of `details`.
_KEY_FIELDS = {"hook", "layer", "latent", "kind", "time", "score", "details"}
DEFAULT_KIND = "simulation"
DEFAULT_LANG = "en"


def _str(x):
    return None if x is None else str(x)


def _num(x):
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(x):
    if x is None or isinstance(x, bool):
        return None
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def score_kind(rec: dict) -> str:
    """A score record's kind; v2 records said "correlation" for the simulation scorer's Pearson r."""
    kind = rec.get("kind") or DEFAULT_KIND
    return DEFAULT_KIND if kind == "correlation" else str(kind)


def score_values(rec: dict) -> dict:
    """The column values of a score record (agreed fields; older records kept `value` in `score`)."""
    value = rec.get("value", rec.get("score"))
    details = rec.get("details")
    details = dict(details) if isinstance(details, dict) else {}
    # fields of older records (mode, segments, ...) that have no column stay in details
    details.update({k: v for k, v in rec.items() if k not in _KEY_FIELDS and k not in SCORE_COLUMNS})
    n_examples = rec.get("n_examples")
    if n_examples is None and isinstance(rec.get("segments"), list):
        n_examples = len(rec["segments"])
    beats = rec.get("beats_shuffled")
    return {"value": _num(value), "ci_low": _num(rec.get("ci_low")), "ci_high": _num(rec.get("ci_high")),
            "control_shuffled": _num(rec.get("control_shuffled")),
            "control_constant": _num(rec.get("control_constant")),
            "beats_shuffled": None if beats is None else int(bool(beats)),
            "n_examples": _int(n_examples), "llm_calls": _int(rec.get("llm_calls")),
            "prompt_tokens": _int(rec.get("prompt_tokens")), "completion_tokens": _int(rec.get("completion_tokens")),
            "status": _str(rec.get("status")), "failure": _str(rec.get("failure")),
            "details": json.dumps(details, ensure_ascii=False)}


def write_score(c, lid: int, kind: str, values: dict, time=None, h: str | None = None) -> None:
    cols = ("latent_id", "kind", *SCORE_COLUMNS, "details", "time", "record_hash")
    vals = (lid, kind, *(values.get(k) for k in SCORE_COLUMNS), values.get("details"), _str(time), h)
    updates = ", ".join(f"{k}=excluded.{k}" for k in cols[2:])
    c.execute(f"INSERT INTO scores({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
              f"ON CONFLICT(latent_id, kind) DO UPDATE SET {updates}", vals)


def write_score_record(c, lid: int, rec: dict, h: str) -> None:
    write_score(c, lid, score_kind(rec), score_values(rec), rec.get("time"), h)


def write_explanation_lang(c, lid: int, lang: str, text, source) -> None:
    """Store one language's explanation; the primary one (searched, shown in tables) is English when
    there is one, else the first language stored."""
    c.execute("INSERT INTO explanation_langs(latent_id, lang, text, source) VALUES (?,?,?,?) "
              "ON CONFLICT(latent_id, lang) DO UPDATE SET text=excluded.text, source=excluded.source",
              (lid, lang, text, _str(source)))


def primary_lang(c, lid: int) -> str | None:
    row = c.execute("SELECT lang FROM explanations WHERE latent_id = ?", (lid,)).fetchone()
    return None if row is None else (row[0] or DEFAULT_LANG)


def takes_primary(c, lid: int, lang: str) -> bool:
    """Whether an explanation in `lang` becomes the latent's primary one."""
    have = primary_lang(c, lid)
    return have is None or have == lang or lang == DEFAULT_LANG


def write_explanation_record(c, lid: int, rec: dict, h: str) -> None:
    """An explain-stage record: the primary explanation (with its provenance) and its language row."""
    lang = str(rec.get("lang") or rec.get("language") or DEFAULT_LANG)
    text = rec.get("explanation")
    write_explanation_lang(c, lid, lang, text, rec.get("prompt_version") or rec.get("model"))
    if not takes_primary(c, lid, lang):
        return
    c.execute("INSERT INTO explanations(latent_id, text, status, error, llm, prompt_version, time, raw, prompt_tokens, "
              "record_hash, lang) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(latent_id) DO UPDATE SET "
              "text=excluded.text, status=excluded.status, error=excluded.error, llm=excluded.llm, "
              "prompt_version=excluded.prompt_version, time=excluded.time, raw=excluded.raw, "
              "prompt_tokens=excluded.prompt_tokens, record_hash=excluded.record_hash, lang=excluded.lang",
              (lid, text, rec.get("status"), _str(rec.get("error")), rec.get("model"), _str(rec.get("prompt_version")),
               _str(rec.get("time")), _str(rec.get("raw")), rec.get("prompt_tokens"), h, lang))


def write_tag_list(c, lid: int, tags: list[str], evidence=None, thresholds=None, time=None, h: str | None = None):
    """Replace a latent's tags (order kept) and its tag record."""
    c.execute("DELETE FROM tags WHERE latent_id = ?", (lid,))
    per_domain = evidence if isinstance(evidence, dict) else {}
    c.executemany("INSERT OR IGNORE INTO tags(latent_id, position, domain, evidence) VALUES (?,?,?,?)",
                  [(lid, i, d, json.dumps(per_domain.get(d), ensure_ascii=False) if d in per_domain else None)
                   for i, d in enumerate(tags)])
    c.execute("INSERT OR REPLACE INTO tag_records(latent_id, tag_list, evidence, thresholds, time, record_hash) "
              "VALUES (?,?,?,?,?,?)",
              (lid, json.dumps(list(tags), ensure_ascii=False),
               None if evidence is None else json.dumps(evidence, ensure_ascii=False),
               None if thresholds is None else json.dumps(thresholds, ensure_ascii=False), time, h))


def write_tag_record(c, lid: int, rec: dict, h: str) -> None:
    write_tag_list(c, lid, [str(t) for t in rec.get("tags") or []], rec.get("evidence"), rec.get("thresholds"),
                   _str(rec.get("time")), h)
