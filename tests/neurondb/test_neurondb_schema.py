"""Neuron DB schema: creation, migration from version 1, and refusing files that are not neuron DBs."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from safesail.errors import UserError
from safesail.neurondb import NeuronDB, schema


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fresh_db_has_current_schema(tmp_path):
    db = NeuronDB.create_or_open(tmp_path / "n.sqlite", "tiny", "smoke", "safesail-run")
    assert db.model_info() == {"model": "tiny", "run": "smoke", "schema_version": schema.SCHEMA_VERSION,
                               "source": "safesail-run"}
    tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master")}
    assert {"saes", "latents", "explanations", "scores", "tags", "segments", "explanations_fts",
            "release_indices"} <= tables
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert schema.application_id(db.conn) == schema.APPLICATION_ID
    db.close()


def test_v1_file_is_migrated_and_searchable(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    schema.create_version(conn, 1)
    assert schema.user_version(conn) == 1
    conn.execute("INSERT INTO meta VALUES ('model', 'tiny'), ('run', 'old'), ('source', 'safesail-run')")
    conn.execute("INSERT INTO saes(id, hook, layer, arch, k, width, layout) VALUES (1, 'layers.2.mlp_out', 2, 'topk', 4, 64, 'safesail')")
    conn.execute("INSERT INTO latents(id, sae_id, hook, layer, idx, quantile_999) VALUES (7, 1, 'layers.2.mlp_out', 2, 11, 2.5)")
    conn.execute("INSERT INTO explanations(latent_id, text, status) VALUES (7, 'knives and stabbing', 'ok')")
    conn.execute("INSERT INTO scores(latent_id, kind, value) VALUES (7, 'correlation', 0.42)")
    conn.close()

    db = NeuronDB.open(path)
    assert db.model_info()["schema_version"] == schema.SCHEMA_VERSION == 3
    hits = db.search("stabbing")
    assert [(h["layer"], h["index"], h["score"]) for h in hits] == [(2, 11, 0.42)]
    assert db.lookup("layers.2.mlp_out", [11, 12]) == {11: {"hook": "layers.2.mlp_out", "layer": 2, "index": 11,
                                                           "explanation": "knives and stabbing", "score": 0.42,
                                                           "scores": {"simulation": 0.42}, "tags": []}}
    db.close()
    # A second open finds nothing to migrate and the data is unchanged.
    assert NeuronDB.open(path).search("knives")[0]["index"] == 11


def test_missing_corrupt_foreign_and_newer_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="no neuron database"):
        NeuronDB.open(tmp_path / "missing.sqlite")

    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    before = _sha(junk)
    with pytest.raises(UserError, match="not an SQLite file"):
        NeuronDB.open(junk)
    assert _sha(junk) == before

    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = _sha(foreign)
    with pytest.raises(UserError, match="not a Safe-SAIL neuron database"):
        NeuronDB.open(foreign)
    with pytest.raises(UserError, match="not a Safe-SAIL neuron database"):
        NeuronDB.create_or_open(foreign, "tiny", None, "safesail-run")
    assert _sha(foreign) == before

    # A real neuron DB whose pages were damaged after the header.
    good = tmp_path / "damaged.sqlite"
    NeuronDB.create_or_open(good, "tiny", None, "safesail-run").close()
    data = bytearray(good.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    good.write_bytes(bytes(data))
    with pytest.raises(UserError):
        NeuronDB.open(good)

    newer = tmp_path / "newer.sqlite"
    NeuronDB.create_or_open(newer, "tiny", None, "safesail-run").close()
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(UserError, match="newer"):
        NeuronDB.open(newer)
