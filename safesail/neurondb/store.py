"""`NeuronDB`: open, query and write the neuron database (one SQLite file).

Readers (the diagnose stage, the query CLI) use `NeuronDB.open(path)`; the
writers (`build`, `import_safesail`) use `NeuronDB.create_or_open(...)` and
`with db.transaction(): ...`. The file is in WAL mode, and each build or import
is one transaction: readers keep seeing the previous complete database until
the writer commits, and a writer killed halfway leaves it as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from safesail.errors import UserError
from safesail.neurondb import files, load_verify, schema, search as search_mod
from safesail.neurondb.rows import DEFAULT_KIND, SCORE_COLUMNS

log = logging.getLogger(__name__)

SCORE_BANDS = ((None, 0.0, "<0"), (0.0, 0.2, "0-0.2"), (0.2, 0.4, "0.2-0.4"), (0.4, 0.6, "0.4-0.6"),
               (0.6, 0.8, "0.6-0.8"), (0.8, None, ">=0.8"))


# ---- blobs: numpy arrays stored as little-endian bytes -------------------------
def f32_blob(x) -> bytes | None:
    if x is None:
        return None
    return np.ascontiguousarray(np.asarray(x, dtype="<f4")).tobytes()


def i32_blob(x) -> bytes | None:
    if x is None:
        return None
    return np.ascontiguousarray(np.asarray(x, dtype="<i4")).tobytes()


def from_f32(b: bytes | None) -> list[float] | None:
    return None if b is None else np.frombuffer(b, dtype="<f4").tolist()


def from_i32(b: bytes | None) -> list[int] | None:
    return None if b is None else np.frombuffer(b, dtype="<i4").tolist()


def _loads(s: str | None):
    return None if s is None else json.loads(s)


class NeuronDB:
    """A neuron database file. Thread-safe: one connection guarded by a lock."""

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool):
        self.conn = conn
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        # lookup cache: hook -> {idx: row}, valid while PRAGMA data_version is unchanged
        self._cache: dict[str, dict[int, tuple]] = {}
        self._cache_version: int | None = None

    # ---- opening -------------------------------------------------------------
    @classmethod
    def open(cls, path, readonly: bool = True, check: bool = False) -> "NeuronDB":
        """Open an existing neuron DB; a missing, corrupt or foreign file raises UserError.

        `check` runs SQLite's quick integrity check first (the diagnose server does, once).
        A file of an older schema version is migrated in place (one transaction).
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no neuron database at {path}; build one with `safesail db build` "
                            "or import Safe-SAIL's release with `safesail db import`.")
        if path.stat().st_size:
            files.check_header(path)
        if files.is_schemaless(path):
            raise UserError(f"{path} holds no neuron-DB schema yet (its first build was interrupted); run "
                            "`safesail db build` (or `safesail db import`) again, which replaces it.")
        if check:
            problem = files.integrity_problem(path)
            if problem:
                raise UserError(files.corrupt_advice(path, problem))
        try:
            conn = files.connect(path, readonly)
            version = schema.user_version(conn)
            app = schema.application_id(conn)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise UserError(files.corrupt_advice(path, str(e))) from None
        if app != schema.APPLICATION_ID or "meta" not in tables or "latents" not in tables:
            conn.close()
            raise UserError(f"{path} is an SQLite file but not a Safe-SAIL neuron database; "
                            "point --db at a file made by `safesail db build` or `safesail db import`.")
        if version > schema.SCHEMA_VERSION:
            conn.close()
            raise UserError(f"{path} has neuron-DB schema version {version}, newer than this Safe-SAIL "
                            f"understands ({schema.SCHEMA_VERSION}); upgrade Safe-SAIL.")
        if version < schema.SCHEMA_VERSION:
            conn.close()
            if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
                raise UserError(f"{path} has the old schema version {version} and is not writable, so it "
                                "cannot be migrated; copy it somewhere writable and open it there.")
            wconn = files.connect(path, readonly=False)
            old = schema.migrate(wconn)
            wconn.close()
            log.info("migrated %s from schema version %d to %d", path, old, schema.SCHEMA_VERSION)
            conn = files.connect(path, readonly)
        return cls(conn, path, readonly)

    @classmethod
    def create_or_open(cls, path, model: str, run: str | None, source: str) -> "NeuronDB":
        """Open `path` for writing, creating an empty DB for `model` if missing.

        The new file is made under a temporary name and renamed into place; a file left
        without a schema by an interrupted creation is replaced. An existing DB of another
        model raises UserError (and is left untouched).
        """
        path = Path(path)
        if files.is_schemaless(path):
            log.warning("%s holds no schema (an interrupted first build); replacing it", path)
            files.remove_with_side_files(path)
        if path.exists():
            db = cls.open(path, readonly=False)
            have = db.model_info().get("model")
            if have != model:
                db.close()
                raise UserError(f"{path} holds the neuron DB of model {have!r}, not {model!r}; "
                                "write to another file with --db or pick the matching model.")
            files.ensure_wal(db.conn)
            return db
        files.create_atomically(path, {"model": model, "run": run, "source": source})
        db = cls.open(path, readonly=False)
        files.ensure_wal(db.conn)
        return db

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction: everything inside commits together or not at all."""
        if self.readonly:
            raise RuntimeError("this NeuronDB was opened read-only")
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            self._cache.clear()

    # ---- small helpers -------------------------------------------------------
    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as e:
                raise UserError(files.corrupt_advice(self.path, str(e))) from None

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                          "value = excluded.value", (key, None if value is None else str(value)))

    def hook_for_layer(self, layer: int) -> str:
        hooks = [r[0] for r in self._all("SELECT hook FROM saes WHERE layer = ? ORDER BY hook", (int(layer),))]
        if not hooks:
            raise UserError(f"the neuron database has no SAE on layer {layer}; `safesail db stats` lists "
                            "the layers it holds.")
        if len(hooks) > 1:
            raise UserError(f"layer {layer} has several hook points ({', '.join(hooks)}); name one with --hook.")
        return hooks[0]

    # ---- the read API --------------------------------------------------------
    def model_info(self) -> dict:
        meta = {r[0]: r[1] for r in self._all("SELECT key, value FROM meta")}
        return {"model": meta.get("model"), "run": meta.get("run"),
                "schema_version": schema.user_version(self.conn), "source": meta.get("source"),
                **{k: v for k, v in meta.items() if k not in {"model", "run", "source"}}}

    def saes(self) -> list[dict]:
        rows = self._all("SELECT hook, layer, arch, k, width, d_in, path, layout FROM saes ORDER BY layer, hook")
        return [{"hook": r[0], "layer": r[1], "arch": r[2], "k": r[3], "width": r[4], "d_in": r[5],
                 "path": r[6], "layout": r[7]} for r in rows]

    def normalizers(self, hook: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent ids int64 [m], 0.999 quantiles float32 [m]) of the hook's latents that have one."""
        rows = self._all("SELECT idx, quantile_999 FROM latents WHERE hook = ? AND quantile_999 IS NOT NULL "
                         "ORDER BY idx", (hook,))
        ids = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        q = torch.tensor([r[1] for r in rows], dtype=torch.float32)
        return ids, q

    _LOOKUP_HOOK = ("SELECT l.idx, l.layer, e.text, s.value, t.tag_list FROM latents l "
                    "LEFT JOIN explanations e ON e.latent_id = l.id "
                    f"LEFT JOIN scores s ON s.latent_id = l.id AND s.kind = '{DEFAULT_KIND}' "
                    "LEFT JOIN tag_records t ON t.latent_id = l.id WHERE l.hook = ?")
    _KINDS_HOOK = ("SELECT l.idx, s.kind, s.value FROM scores s JOIN latents l ON l.id = s.latent_id "
                   "WHERE l.hook = ? AND s.value IS NOT NULL ORDER BY s.kind")

    def _hook_rows(self, hook: str) -> dict[int, tuple]:
        """All lookup rows of a hook, cached until another connection commits (PRAGMA data_version)."""
        version = self._all("PRAGMA data_version")[0][0]
        if version != self._cache_version:
            self._cache.clear()
            self._cache_version = version
        rows = self._cache.get(hook)
        if rows is None:
            kinds: dict[int, dict[str, float]] = {}
            for idx, kind, value in self._all(self._KINDS_HOOK, (hook,)):
                kinds.setdefault(idx, {})[kind] = value
            rows = {r[0]: (r[1], r[2], r[3], tuple(json.loads(r[4])) if r[4] else (), kinds.get(r[0], {}))
                    for r in self._all(self._LOOKUP_HOOK, (hook,))}
            self._cache[hook] = rows
        return rows

    def lookup(self, hook: str, latent_ids: Sequence[int]) -> dict[int, dict]:
        """Explanation, simulation score, every kind's score and tags of the given latents of `hook`.

        The hot path of diagnose: the hook's rows are read once into memory and served from
        there until the file changes (a rebuild committed by another process).
        """
        with self._lock:
            rows = self._hook_rows(hook)
        out: dict[int, dict] = {}
        for i in latent_ids:
            r = rows.get(int(i))
            if r is not None:
                out[int(i)] = {"hook": hook, "layer": r[0], "index": int(i), "explanation": r[1], "score": r[2],
                               "scores": dict(r[4]), "tags": list(r[3])}
        return out

    _LOOKUP = _LOOKUP_HOOK + " AND l.idx IN (SELECT value FROM json_each(?))"

    def lookup_uncached(self, hook: str, latent_ids: Sequence[int]) -> dict[int, dict]:
        """`lookup` with one SQL query per call and no cache (benchmark baseline, one-off callers)."""
        ids = json.dumps([int(i) for i in latent_ids])
        kinds: dict[int, dict[str, float]] = {}
        for idx, kind, value in self._all(self._KINDS_HOOK.replace(" ORDER BY", " AND l.idx IN "
                                                                   "(SELECT value FROM json_each(?)) ORDER BY"),
                                          (hook, ids)):
            kinds.setdefault(idx, {})[kind] = value
        out: dict[int, dict] = {}
        for idx, layer, text, value, tag_list in self._all(self._LOOKUP, (hook, ids)):
            out[idx] = {"hook": hook, "layer": layer, "index": idx, "explanation": text, "score": value,
                        "scores": kinds.get(idx, {}), "tags": json.loads(tag_list) if tag_list else []}
        return out

    def latent(self, hook: str, index: int, max_examples: int | None = None) -> dict | None:
        """Everything the DB knows about one latent, or None."""
        rows = self._all("SELECT id FROM latents WHERE hook = ? AND idx = ?", (hook, int(index)))
        if not rows:
            return None
        return self._latent_record(rows[0][0], max_examples)

    def iter_latents(self) -> Iterator[dict]:
        """Every latent, in (layer, hook, index) order, as `latent()` returns it."""
        ids = [r[0] for r in self._all("SELECT id FROM latents ORDER BY layer, hook, idx")]
        for lid in ids:
            yield self._latent_record(lid, None)

    def _latent_record(self, lid: int, max_examples: int | None) -> dict:
        (hook, layer, idx, density, q999, qsrc, max_act, ntok, hc, he, top, bot) = self._all(
            "SELECT hook, layer, idx, density, quantile_999, quantile_source, max_act, num_tokens, "
            "hist_counts, hist_edges, top_acts, bottom_acts FROM latents WHERE id = ?", (lid,))[0]
        rec: dict[str, Any] = {"hook": hook, "layer": layer, "index": idx, "density": density,
                               "quantile_999": q999, "quantile_source": qsrc, "max_act": max_act,
                               "num_tokens": ntok,
                               "histogram": None if hc is None else {"counts": from_f32(hc), "edges": from_f32(he)},
                               "top_acts": from_f32(top), "bottom_acts": from_f32(bot)}
        e = self._all("SELECT text, status, error, llm, prompt_version, time, raw, prompt_tokens "
                      "FROM explanations WHERE latent_id = ?", (lid,))
        rec["explanation"] = e[0][0] if e else None
        rec["explanation_details"] = (dict(zip(("text", "status", "error", "llm", "prompt_version", "time",
                                                "raw", "prompt_tokens"), e[0])) if e else None)
        rec["explanations"] = {lang: text for lang, text in self._all(
            "SELECT lang, text FROM explanation_langs WHERE latent_id = ? ORDER BY lang = 'en' DESC, lang", (lid,))}
        cols = ("kind", *SCORE_COLUMNS, "details", "time")
        scores = {}
        for r in self._all(f"SELECT {', '.join(cols)} FROM scores WHERE latent_id = ? "
                           f"ORDER BY kind = '{DEFAULT_KIND}' DESC, kind", (lid,)):
            d = dict(zip(cols, r))
            d["details"] = _loads(d["details"])
            d["beats_shuffled"] = None if d["beats_shuffled"] is None else bool(d["beats_shuffled"])
            scores[d.pop("kind")] = d
        rec["scores"] = scores
        sim = scores.get(DEFAULT_KIND)
        rec["score"] = sim["value"] if sim else None
        rec["score_details"] = {"kind": DEFAULT_KIND, **sim} if sim else None
        with self._lock:
            rec["verify_effects"] = load_verify.effects_of(self.conn, lid)
        t = self._all("SELECT tag_list, evidence, thresholds, time FROM tag_records WHERE latent_id = ?", (lid,))
        rec["tags"] = json.loads(t[0][0]) if t else []
        rec["tag_details"] = ({"evidence": _loads(t[0][1]), "thresholds": _loads(t[0][2]), "time": t[0][3]}
                              if t else None)
        sql = ("SELECT rank, segment_id, split, kind, level, doc_id, start, token_ids, tokens, acts "
               "FROM segments WHERE latent_id = ? ORDER BY rank")
        params: tuple = (lid,)
        if max_examples is not None:
            sql += " LIMIT ?"
            params = (lid, int(max_examples))
        rec["examples"] = [{"rank": r[0], "segment_id": r[1], "split": r[2], "kind": r[3], "level": r[4],
                            "doc_id": r[5], "start": r[6], "token_ids": from_i32(r[7]), "tokens": _loads(r[8]),
                            "acts": from_f32(r[9])} for r in self._all(sql, params)]
        return rec

    def search(self, text: str | None = None, domain: str | None = None, min_score: float | None = None,
               max_score: float | None = None, layer: int | None = None, limit: int = 50,
               kind: str = DEFAULT_KIND) -> list[dict]:
        """Latents whose explanation matches `text`, filtered by domain, a score range of scorer `kind`
        (default simulation) and layer; each hit carries that kind's score (`search.py`)."""
        sql, params = search_mod.search_sql(text, domain, min_score, max_score, layer, limit, kind)
        return search_mod.rows_to_hits(self._all(sql, params), kind)

    def score_kinds(self) -> list[str]:
        return [r[0] for r in self._all("SELECT DISTINCT kind FROM scores ORDER BY kind")]

    def stats(self) -> dict:
        """Counts per layer, per domain and per score band."""
        per_layer = {}
        for layer, n, n_expl, n_scored, n_tagged in self._all(
                "SELECT l.layer, count(*), count(e.latent_id), count(s.value), "
                "sum(EXISTS (SELECT 1 FROM tags g WHERE g.latent_id = l.id)) FROM latents l "
                "LEFT JOIN explanations e ON e.latent_id = l.id "
                f"LEFT JOIN scores s ON s.latent_id = l.id AND s.kind = '{DEFAULT_KIND}' "
                "GROUP BY l.layer ORDER BY l.layer"):
            per_layer[layer] = {"latents": n, "explained": n_expl, "scored": n_scored, "tagged": int(n_tagged or 0)}
        per_domain = {d: n for d, n in self._all("SELECT domain, count(*) FROM tags GROUP BY domain ORDER BY domain")}
        per_domain["general"] = self._all(
            "SELECT count(*) FROM explanations e WHERE NOT EXISTS "
            "(SELECT 1 FROM tags g WHERE g.latent_id = e.latent_id)")[0][0]
        bands = {}
        for lo, hi, name in SCORE_BANDS:
            cond, p = [], []
            if lo is not None:
                cond.append("value >= ?")
                p.append(lo)
            if hi is not None:
                cond.append("value < ?")
                p.append(hi)
            bands[name] = self._all(f"SELECT count(*) FROM scores WHERE kind = '{DEFAULT_KIND}' AND "
                                    "value IS NOT NULL AND " + " AND ".join(cond), p)[0][0]
        bands["unscored"] = self._all("SELECT count(*) FROM latents l LEFT JOIN scores s ON s.latent_id = l.id "
                                      f"AND s.kind = '{DEFAULT_KIND}' WHERE s.value IS NULL")[0][0]
        per_kind = {k: {"scored": n, "mean": m, "beats_shuffled": int(b or 0)} for k, n, m, b in self._all(
            "SELECT kind, count(value), avg(value), sum(beats_shuffled) FROM scores GROUP BY kind ORDER BY kind")}
        totals = {"latents": sum(v["latents"] for v in per_layer.values()),
                  "explained": sum(v["explained"] for v in per_layer.values()),
                  "tagged": sum(v["tagged"] for v in per_layer.values())}
        return {**self.model_info(), "totals": totals, "per_layer": per_layer, "per_domain": per_domain,
                "per_score_band": bands, "per_kind": per_kind,
                "verify_effects": self._all("SELECT count(*) FROM verify_effects")[0][0]}


