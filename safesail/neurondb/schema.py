"""The neuron DB's SQLite schema, its version, and the migrations between versions.

A fresh file is made by applying version 1 and then every migration in order, so
the migration code runs on every new database, not only on old files.

Version history
- 1: meta (model, run, source), saes, latents (density, 0.999 quantile,
     histogram, top/bottom activation tables), explanations, scores, tags,
     tag_records, segments, inputs (hashes of the files a build read).
- 2: full-text search over explanations (FTS5, kept in sync by triggers),
     release_indices (the exact order of a Safe-SAIL `indices_layer{L}.pt`),
     indexes for the query CLI.
- 3: scores keyed by (latent, kind) with an interval, the two controls (shuffled
     explanation, constant prediction), cost and example counts (the scoring
     family: simulation, detection, fuzzing); `explanation_langs` (every
     language's explanation of a latent side by side, e.g. Safe-SAIL's en_db and
     cn_db); `release_entries` (the order and bytes of imported release entries);
     `verify_effects` (causal checks: steering, ablation, refusal).
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 3
# PRAGMA application_id marks a file as a Safe-SAIL neuron DB ("SSAI").
APPLICATION_ID = 0x53534149

V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE saes (
    id INTEGER PRIMARY KEY,
    hook TEXT NOT NULL UNIQUE,
    layer INTEGER NOT NULL,
    arch TEXT, k INTEGER, width INTEGER, d_in INTEGER,
    path TEXT, layout TEXT NOT NULL,
    cfg TEXT
);
CREATE TABLE latents (
    id INTEGER PRIMARY KEY,
    sae_id INTEGER NOT NULL REFERENCES saes(id) ON DELETE CASCADE,
    hook TEXT NOT NULL,
    layer INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    density REAL,
    quantile_999 REAL,
    quantile_source TEXT,
    max_act REAL,
    num_tokens INTEGER,
    hist_counts BLOB, hist_edges BLOB,
    top_acts BLOB, bottom_acts BLOB,
    stats_hash TEXT,
    UNIQUE (hook, idx)
);
CREATE TABLE explanations (
    latent_id INTEGER PRIMARY KEY REFERENCES latents(id) ON DELETE CASCADE,
    text TEXT, status TEXT, error TEXT, llm TEXT, prompt_version TEXT, time TEXT,
    raw TEXT, prompt_tokens INTEGER,
    record_hash TEXT
);
CREATE TABLE scores (
    latent_id INTEGER PRIMARY KEY REFERENCES latents(id) ON DELETE CASCADE,
    kind TEXT, value REAL, status TEXT, failure TEXT, details TEXT, time TEXT,
    record_hash TEXT
);
CREATE TABLE tags (
    latent_id INTEGER NOT NULL REFERENCES latents(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    domain TEXT NOT NULL,
    evidence TEXT,
    PRIMARY KEY (latent_id, domain)
);
CREATE TABLE tag_records (
    latent_id INTEGER PRIMARY KEY REFERENCES latents(id) ON DELETE CASCADE,
    tag_list TEXT NOT NULL, evidence TEXT, thresholds TEXT, time TEXT,
    record_hash TEXT
);
CREATE TABLE segments (
    latent_id INTEGER NOT NULL REFERENCES latents(id) ON DELETE CASCADE,
    rank INTEGER NOT NULL,
    segment_id TEXT, split TEXT, kind TEXT, level INTEGER, doc_id TEXT, start INTEGER,
    token_ids BLOB, tokens TEXT, acts BLOB,
    PRIMARY KEY (latent_id, rank)
);
CREATE TABLE inputs (hook TEXT NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL,
                     PRIMARY KEY (hook, name));
"""

V1_TO_V2 = """
CREATE VIRTUAL TABLE explanations_fts USING fts5(
    text, content='explanations', content_rowid='latent_id', tokenize='unicode61');
CREATE TRIGGER explanations_ai AFTER INSERT ON explanations BEGIN
    INSERT INTO explanations_fts(rowid, text) VALUES (new.latent_id, new.text);
END;
CREATE TRIGGER explanations_ad AFTER DELETE ON explanations BEGIN
    INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES ('delete', old.latent_id, old.text);
END;
CREATE TRIGGER explanations_au AFTER UPDATE OF text ON explanations BEGIN
    INSERT INTO explanations_fts(explanations_fts, rowid, text) VALUES ('delete', old.latent_id, old.text);
    INSERT INTO explanations_fts(rowid, text) VALUES (new.latent_id, new.text);
END;
INSERT INTO explanations_fts(explanations_fts) VALUES ('rebuild');
CREATE TABLE release_indices (
    hook TEXT NOT NULL, position INTEGER NOT NULL, idx INTEGER NOT NULL,
    PRIMARY KEY (hook, position)
);
CREATE INDEX latents_layer ON latents(layer, idx);
CREATE INDEX tags_domain ON tags(domain);
CREATE INDEX scores_value ON scores(value);
"""

# Version 2 scores had one row per latent; kind was "correlation" (imports) or "simulation" (runs),
# both the simulation scorer's Pearson correlation. Cost fields lived inside `details`.
V2_TO_V3 = """
CREATE TABLE scores_v3 (
    latent_id INTEGER NOT NULL REFERENCES latents(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    value REAL, ci_low REAL, ci_high REAL,
    control_shuffled REAL, control_constant REAL, beats_shuffled INTEGER,
    n_examples INTEGER, llm_calls INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER,
    status TEXT, failure TEXT, details TEXT, time TEXT,
    record_hash TEXT,
    PRIMARY KEY (latent_id, kind)
);
INSERT INTO scores_v3(latent_id, kind, value, n_examples, llm_calls, prompt_tokens, completion_tokens,
                      status, failure, details, time, record_hash)
    SELECT latent_id,
           CASE WHEN kind IS NULL OR kind = 'correlation' THEN 'simulation' ELSE kind END,
           value,
           CASE WHEN json_valid(details) AND json_type(details, '$.segments') = 'array'
                THEN json_array_length(details, '$.segments') END,
           CASE WHEN json_valid(details) THEN json_extract(details, '$.llm_calls') END,
           CASE WHEN json_valid(details) THEN json_extract(details, '$.prompt_tokens') END,
           CASE WHEN json_valid(details) THEN json_extract(details, '$.completion_tokens') END,
           status, failure, details, time, record_hash
    FROM scores;
DROP TABLE scores;
ALTER TABLE scores_v3 RENAME TO scores;
CREATE INDEX scores_kind_value ON scores(kind, value);
ALTER TABLE explanations ADD COLUMN lang TEXT;
UPDATE explanations SET lang = CASE WHEN prompt_version = 'cn_db.json' THEN 'cn' ELSE 'en' END;
CREATE TABLE explanation_langs (
    latent_id INTEGER NOT NULL REFERENCES latents(id) ON DELETE CASCADE,
    lang TEXT NOT NULL,
    text TEXT, source TEXT,
    PRIMARY KEY (latent_id, lang)
);
INSERT INTO explanation_langs(latent_id, lang, text, source)
    SELECT latent_id, lang, text, COALESCE(prompt_version, llm) FROM explanations;
CREATE TABLE release_entries (
    lang TEXT NOT NULL,
    position INTEGER NOT NULL,
    latent_id INTEGER NOT NULL REFERENCES latents(id) ON DELETE CASCADE,
    raw TEXT NOT NULL,
    PRIMARY KEY (lang, position)
);
CREATE TABLE verify_effects (
    id INTEGER PRIMARY KEY,
    latent_id INTEGER REFERENCES latents(id) ON DELETE CASCADE,
    hook TEXT NOT NULL, layer INTEGER NOT NULL, latent INTEGER,
    target TEXT NOT NULL, domain TEXT, lang TEXT, "check" TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL, ci_low REAL, ci_high REAL, n INTEGER, details TEXT
);
CREATE INDEX verify_effects_latent ON verify_effects(latent_id);
"""

# from-version -> script that brings the file to from-version + 1
MIGRATIONS: dict[int, str] = {1: V1_TO_V2, 2: V2_TO_V3}


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def application_id(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA application_id").fetchone()[0])


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT first; run statement by statement inside the caller's transaction.
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            conn.execute(buf)
            buf = ""
    if buf.strip():
        conn.execute(buf)


def create_version(conn: sqlite3.Connection, version: int = SCHEMA_VERSION) -> None:
    """Create the schema at `version` (1..SCHEMA_VERSION) in one transaction; the file must be empty."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        _run_script(conn, V1)
        conn.execute("PRAGMA user_version = 1")
        for v in range(1, version):
            _run_script(conn, MIGRATIONS[v])
            conn.execute(f"PRAGMA user_version = {v + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection) -> int:
    """Bring an older file to SCHEMA_VERSION in one transaction; returns the version it had."""
    old = user_version(conn)
    if old >= SCHEMA_VERSION:
        return old
    conn.execute("BEGIN IMMEDIATE")
    try:
        for v in range(old, SCHEMA_VERSION):
            _run_script(conn, MIGRATIONS[v])
            conn.execute(f"PRAGMA user_version = {v + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return old
