"""Writing one hook point's activation cache: shards, the progress log, meta.json.

Crash safety (kill -9 at any moment loses nothing and duplicates nothing):
a shard is written to a hidden temporary file and renamed into place, then a
line naming it and its windows is appended to `progress-r<rank>.jsonl`. Only
shards named in a progress log count; a shard renamed but not yet logged is an
orphan, recomputed on re-run and deleted when the cache is finalised. A torn
last progress line is dropped. Each process appends only to its own log.

Integrity: each log line records the shard's size in bytes; a resumed (or
already finished) cache checks every committed shard against it and against
its safetensors header, and recomputes the ones that are cut short or damaged.
A write that fails because the disk is full surfaces as an OSError (ENOSPC)
naming the shard, so the CLI prints one sentence; the resume is exact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import re
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from safesail.errors import UserError
from safesail.rundir import atomic_write_json, atomic_write_text
from safesail.train.activation_store import FORMAT, VERSION, load_shard, shard_problem, split_of

log = logging.getLogger(__name__)

# Fields of meta.json that must match for a re-run to continue an existing cache.
IDENTITY_KEYS = ("model", "hook", "d", "model_id", "ctx_len", "dtype", "eval_every", "data_fingerprint")
_LABELS = {"model": "model", "hook": "hook", "d": "width d", "model_id": "model weights",
           "ctx_len": "data.ctx_len", "dtype": "cache.dtype", "eval_every": "cache.eval_every",
           "data_fingerprint": "another corpus or data config (fingerprint)"}
_WHAT_TO_DO = "delete that folder or pick another run.name=..."


def shard_name(first_window: int) -> str:
    return f"w{first_window:09d}.safetensors"


def progress_path(folder: Path, rank: int) -> Path:
    return folder / f"progress-r{rank}.jsonl"


def read_progress(folder: Path) -> list[dict]:
    """All committed shard records of a hook folder (every rank's log; torn lines skipped)."""
    out = []
    for path in sorted(folder.glob("progress-r*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "file" in rec and "windows" in rec:
                out.append(rec)
    return out


def repair_progress(folder: Path, rank: int) -> None:
    """Drop a torn last line from this rank's log so that appends start on a fresh line."""
    path = progress_path(folder, rank)
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):
        good = [ln for ln in text.splitlines() if _parses(ln)]
        atomic_write_text(path, "".join(ln + "\n" for ln in good))


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def drop_bad_shards(folder: Path) -> list[str]:
    """Forget committed shards that are missing, cut short or damaged, so that the run recomputes them.

    Rewrites every progress log without them (torn lines dropped too), deletes the bad files and
    marks meta.json incomplete; returns "<file> <problem>" for each. Call it from one process only,
    before the others read the logs.
    """
    bad: list[str] = []
    for path in sorted(folder.glob("progress-r*.jsonl")):
        keep, dropped = [], False
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped = True
                continue
            problem = shard_problem(folder / rec["file"], rec.get("bytes")) if isinstance(rec, dict) and "file" in rec \
                else None
            if problem:
                bad.append(f"{rec['file']} {problem}")
                (folder / rec["file"]).unlink(missing_ok=True)
                dropped = True
                continue
            keep.append(line)
        if dropped:
            atomic_write_text(path, "".join(ln + "\n" for ln in keep))
    meta_path = folder / "meta.json"
    if bad and meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("status") != "incomplete":
            atomic_write_json(meta_path, {**meta, "status": "incomplete"})
    return bad


def cache_intact(folder: Path) -> bool:
    """A finished cache whose every listed shard is whole (the check behind "already done")."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("status") != "complete":
        return False
    return all(shard_problem(folder / s["file"], s.get("bytes")) is None for s in meta.get("shards", []))


def check_existing(folder: Path, identity: dict) -> dict | None:
    """The existing meta.json if it matches `identity`; a UserError if the folder holds another cache."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        stray = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        if stray:
            raise UserError(f"{folder} already holds files ({stray[0]}, ...) but no meta.json of a Safe-SAIL "
                            f"cache; {_WHAT_TO_DO}")
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{meta_path} is not valid JSON; {_WHAT_TO_DO}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{folder} holds something other than a Safe-SAIL activation cache; {_WHAT_TO_DO}")
    for key in IDENTITY_KEYS:
        if key == "data_fingerprint" and meta.get(key) != identity.get(key):
            raise UserError(f"the existing cache {folder} was made from another corpus or data config; {_WHAT_TO_DO}")
        if meta.get(key) != identity.get(key):
            raise UserError(f"the existing cache {folder} was made with {_LABELS[key]} {meta.get(key)!r}, not "
                            f"{identity.get(key)!r}; {_WHAT_TO_DO}")
    return meta


def start_meta(folder: Path, identity: dict, extra: dict) -> None:
    """Record the cache's identity before any shard is written (status: incomplete)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "meta.json", {"format": FORMAT, "version": VERSION, "status": "incomplete",
                                             **identity, **extra})


def finalize(folder: Path, num_windows: int, extra: dict) -> dict:
    """Check that every window is stored exactly once, delete orphans, write the complete meta.json."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    records = read_progress(folder)
    seen: set[int] = set()
    for rec in records:
        dup = seen.intersection(rec["windows"])
        if dup:
            raise RuntimeError(f"window {min(dup)} is stored twice in {folder}")
        seen.update(rec["windows"])
    if seen != set(range(num_windows)):
        missing = sorted(set(range(num_windows)) - seen)[:3]
        raise RuntimeError(f"{folder} lacks windows {missing} after caching")
    keep = {rec["file"] for rec in records}
    for p in folder.iterdir():
        if p.name.endswith(".safetensors") and p.name not in keep or p.name.endswith(".tmp"):
            log.info("removing orphan %s (written by a killed run, recomputed since)", p.name)
            p.unlink()
    eval_every = int(meta["eval_every"])
    splits = {s: {"windows": 0, "tokens": 0, "nonspecial": 0} for s in ("train", "eval")}
    shards = []
    for rec in sorted(records, key=lambda r: min(r["windows"])):
        sh = load_shard(folder / rec["file"], ("windows", "special"))
        ctx = int(meta["ctx_len"])
        special = sh["special"].view(-1, ctx)
        for j, w in enumerate(sh["windows"].tolist()):
            s = splits["eval" if split_of(w, eval_every) else "train"]
            s["windows"] += 1
            s["tokens"] += ctx
            s["nonspecial"] += ctx - int(special[j].sum())
        shards.append({"file": rec["file"], "num_windows": len(rec["windows"]),
                       "num_tokens": len(rec["windows"]) * ctx, "bytes": (folder / rec["file"]).stat().st_size})
    total = sum(s["tokens"] for s in splits.values())
    meta.update(extra)
    meta.update(status="complete", num_windows=num_windows, num_tokens=total,
                num_special=total - sum(s["nonspecial"] for s in splits.values()), splits=splits, shards=shards)
    atomic_write_json(folder / "meta.json", meta)
    return meta


class ShardWriter:
    """Writes shards on a background thread so that the forward pass never waits on the disk."""

    def __init__(self, rank: int, max_pending: int = 4):
        self.rank = rank
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="safesail-shard-writer", daemon=True)
        self.thread.start()

    def put(self, folder: Path, windows: list[int], tensors: dict[str, torch.Tensor], hook: str) -> None:
        self._raise()
        self.queue.put((folder, windows, tensors, hook))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def _write(self, folder: Path, windows: list[int], tensors: dict[str, torch.Tensor], hook: str) -> None:
        name = shard_name(windows[0])
        tmp = folder / f".{name}.r{self.rank}.tmp"
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "hook": hook, "windows": json.dumps(windows)})
        except Exception as e:
            tmp.unlink(missing_ok=True)
            os_error = _as_os_error(e, folder / name)
            if os_error is e:
                raise
            raise os_error from e
        size = tmp.stat().st_size
        os.replace(tmp, folder / name)
        line = json.dumps({"file": name, "windows": windows, "tokens": int(tensors["tokens"].numel()), "bytes": size})
        with open(progress_path(folder, self.rank), "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _as_os_error(exc: Exception, path: Path) -> Exception:
    """safetensors reports a failed write (disk full, quota, read-only) as SafetensorError "... (os error 28)":
    turn it into the OSError it stands for, naming the shard, so the CLI's one-sentence disk message applies."""
    if isinstance(exc, OSError):
        return exc if exc.filename else OSError(exc.errno, exc.strerror or str(exc), str(path))
    m = _OS_ERROR.search(str(exc))
    if m is None:
        return exc
    code = int(m.group(1))
    return OSError(code, os.strerror(code) if code in errno.errorcode else str(exc), str(path))
