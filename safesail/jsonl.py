"""Append-only JSONL files (explanations, scores, tags): the one reader and writer.

A run killed mid-write can leave a torn last line: readers skip it with a warning,
writers end it before appending. The last record per (hook, latent) wins.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Iterator, Self

log = logging.getLogger(__name__)


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Every complete JSON object of a JSONL file (nothing when the file does not exist)."""
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
                log.warning("%s line %d is not a complete record (a run killed mid-write?); skipped", path, n)
                continue
            if isinstance(rec, dict):
                yield rec


def last_per_latent(path: Path) -> dict[tuple[str, int], dict]:
    """The last record of each (hook, latent) in an append-only JSONL file."""
    out: dict[tuple[str, int], dict] = {}
    for rec in iter_jsonl(path):
        try:
            out[(str(rec["hook"]), int(rec["latent"]))] = rec
        except (KeyError, TypeError, ValueError):
            log.warning("%s holds a record without hook/latent; skipped", path)
    return out


def open_append(path: Path) -> IO[str]:
    """Open an append-only JSONL file, first ending a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return open(path, "a", encoding="utf-8")


def append_jsonl(f: IO[str], rec: dict, fsync: bool = False) -> None:
    """Append one record and flush it (a crash loses at most this line)."""
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()
    if fsync:
        os.fsync(f.fileno())


class JsonlWriter:
    """Appends records to one JSONL file (`open_append`), one flushed line each; a context manager."""

    def __init__(self, path: Path, fsync: bool = False):
        self.path = Path(path)
        self._fsync = fsync
        self._f = open_append(self.path)

    def write_json(self, rec: dict) -> None:
        append_jsonl(self._f, rec, fsync=self._fsync)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
