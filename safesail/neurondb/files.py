"""The neuron DB as a file: connecting, recognising what a file holds, checking it, creating it atomically.

- A new DB is created under a temporary name (schema and meta committed, journal in
  DELETE mode so no side files) and renamed into place, so a writer killed at any
  moment leaves either no DB or a complete empty one, never a file without a schema.
- A file that holds no schema yet (left by older versions killed at the wrong moment)
  is recognised (`is_schemaless`) and replaced by a writer.
- `integrity_problem` runs SQLite's `PRAGMA quick_check`; a build over a corrupt
  file sets it aside (`set_aside`: renamed to `<name>.corrupt-<time>`) and starts afresh.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

from safesail.errors import UserError
from safesail.neurondb import schema

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-shm", "-journal")


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True,
                               check_same_thread=False, isolation_level=None)
    else:
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=60)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 60000")
    return conn


def check_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check the path and its permissions.") from None
    if head != SQLITE_MAGIC:
        raise UserError(f"{path} is not an SQLite file (corrupt or of another kind); if it is this run's neuron "
                        "DB, `safesail db build` sets it aside and builds a new one, otherwise point --db at the "
                        "right file.")


def header_application_id(path: Path) -> int | None:
    """The application id in an SQLite header (bytes 68-71), read without SQLite; None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(72)
    except OSError:
        return None
    if len(head) < 72 or head[:16] != SQLITE_MAGIC:
        return None
    return int.from_bytes(head[68:72], "big")


def is_schemaless(path: Path) -> bool:
    """True for an empty file or an SQLite file with no tables and no Safe-SAIL mark (an interrupted creation)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.stat().st_size == 0:
        return True
    try:
        with open(path, "rb") as f:
            if f.read(16) != SQLITE_MAGIC:
                return False
        conn = connect(path, readonly=True)
        try:
            n_objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            return n_objects == 0 and schema.application_id(conn) == 0 and schema.user_version(conn) == 0
        finally:
            conn.close()
    except (OSError, sqlite3.DatabaseError):
        return False


def integrity_problem(path: Path) -> str | None:
    """None when SQLite finds the file sound, else the first problem it reports."""
    try:
        check_header(path)
        conn = connect(path, readonly=True)
        try:
            rows = conn.execute("PRAGMA quick_check(5)").fetchall()
        finally:
            conn.close()
    except UserError as e:
        return str(e)
    except sqlite3.DatabaseError as e:
        return str(e)
    msgs = [r[0] for r in rows]
    return None if msgs == ["ok"] else "; ".join(msgs)


def corrupt_advice(path: Path, problem: str) -> str:
    return (f"the neuron database {path} is corrupt ({problem}); run `safesail db build`, which sets the corrupt "
            "file aside and rebuilds the DB from the run's files (for an imported release, run "
            "`safesail db import` again, which does the same).")


def remove_with_side_files(path: Path) -> None:
    for p in [Path(path)] + [Path(f"{path}{s}") for s in SIDE_FILES]:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def set_aside(path: Path) -> Path:
    """Rename a corrupt DB (and its WAL/shared-memory files) out of the way; returns its new name."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(path, aside)
    for s in SIDE_FILES:
        side = Path(f"{path}{s}")
        if side.exists():
            os.replace(side, Path(f"{aside}{s}"))
    return aside


def create_atomically(path: Path, meta: dict[str, str | None]) -> None:
    """Make an empty current-schema DB at `path`: built under a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.creating-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    remove_with_side_files(tmp)
    conn = connect(tmp, readonly=False)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        schema.create_version(conn)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", list(meta.items()))
        conn.execute("COMMIT")
    finally:
        conn.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def ensure_wal(conn: sqlite3.Connection) -> None:
    """Readers keep their view while a build writes: the writer's connection uses WAL."""
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
