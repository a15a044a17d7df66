"""Typed records that cross stage boundaries in interpret/: explanations, tags, latent stats.

- `interpret/explanations.jsonl` (written by `safesail explain`): one `ExplanationRecord` per
  latent attempt; the last record per (hook, latent) wins.
- `interpret/tags.jsonl` (written by `safesail tag`): one `TagRecord` per latent.
- `latents/<hook>/stats.safetensors` + `meta.json` (written by `safesail collect`): one
  `LatentStats` per hook.

Each file has one reader and one writer here. The JSONL files are append-only
(`safesail.jsonl`: a torn last line is skipped). A record keeps keys it does not name in
`extra`, so that a newer writer's fields survive a read and a re-write unchanged. The score
record lives in `interpret/scoring/records.py`, the causal-check record in `verify/records.py`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from safesail.atomic import atomic_save_safetensors, atomic_write_json
from safesail.errors import UserError
from safesail.jsonl import JsonlWriter, iter_jsonl
from safesail import layout

# The stats key of each latent's normaliser: the collect.quantile quantile (0.999 by default,
# Safe-SAIL's). The key keeps its historical name for file compatibility; `LatentStats.q` says
# which quantile it holds.
QUANTILE_KEY = "quantile_999"
STATS_KEYS = ("latent_ids", "density", "top_acts", "bottom_acts", QUANTILE_KEY, "max_act")


@dataclass
class _Record:
    """Fields shared by the per-latent JSONL records; unknown keys are kept in `extra`."""

    hook: str
    layer: int | None
    latent: int
    extra: dict = field(default_factory=dict)

    _ORDER: ClassVar[tuple[str, ...]] = ()

    def key(self) -> tuple[str, int]:
        return (self.hook, self.latent)

    def get(self, name: str, default: Any = None) -> Any:
        """Dict-style access for code that reads records by key name."""
        if name in self.extra:
            return self.extra[name]
        return getattr(self, name, default) if name in self._names() else default

    def __getitem__(self, name: str) -> Any:
        if name in self._names() or name in self.extra:
            return self.get(name)
        raise KeyError(name)

    def __contains__(self, name: str) -> bool:
        return name in self._names() or name in self.extra

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    def to_json(self) -> dict:
        out = {name: getattr(self, name) for name in self._names()}
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, rec: dict):
        names = cls._names()
        if "hook" not in rec or "latent" not in rec:
            raise KeyError("hook/latent")
        core = {k: rec[k] for k in names if k in rec}
        core["hook"], core["latent"] = str(core["hook"]), int(core["latent"])
        core.setdefault("layer", None)
        return cls(**core, extra={k: v for k, v in rec.items() if k not in names})


@dataclass
class ExplanationRecord(_Record):
    status: str = "failed"                 # "ok" | "failed"
    explanation: str | None = None
    error: str | None = None
    reason: str | None = None              # the failure's name (connection, copied_example, ...)
    model: str | None = None
    prompt_version: str | None = None
    raw: str | None = None
    prompt_tokens: int = 0
    segments: int = 0
    cached: bool = False
    elapsed_s: float | None = None
    time: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.explanation)


@dataclass
class TagRecord(_Record):
    tags: list = field(default_factory=list)
    basis: str | None = None
    evidence: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    tagger: str | None = None
    prompt_version: str | None = None
    explanation_key: str | None = None
    time: str = ""


def _read(path: Path, cls) -> dict:
    out: dict = {}
    for rec in iter_jsonl(path):
        try:
            r = cls.from_json(rec)
        except (KeyError, TypeError, ValueError):
            continue
        out.pop(r.key(), None)
        out[r.key()] = r
    return out


def read_explanations(path: Path) -> dict[tuple[str, int], ExplanationRecord]:
    """The last explanation record per (hook, latent) of an explanations file."""
    return _read(path, ExplanationRecord)


def read_tags(path: Path) -> dict[tuple[str, int], TagRecord]:
    """The last tag record per (hook, latent) of a tags file."""
    return _read(path, TagRecord)


class RecordWriter(JsonlWriter):
    """Appends records (typed or plain dicts of the same keys) to one JSONL file, one flushed line each."""

    def write(self, rec) -> None:
        self.write_json(rec.to_json() if isinstance(rec, _Record) else dict(rec))


def explanation_writer(path: Path) -> RecordWriter:
    """The explanations file's writer (every line fsynced: an LLM answer is costly to lose)."""
    return RecordWriter(path, fsync=True)


def tag_writer(path: Path) -> RecordWriter:
    return RecordWriter(path)


# ---- latent stats ------------------------------------------------------------------------------

@dataclass
class LatentStats:
    """One hook's per-latent statistics (`latents/<hook>/`); tensors indexed like `latent_ids`."""

    hook: str
    tensors: dict
    meta: dict

    @property
    def latent_ids(self):
        return self.tensors["latent_ids"]

    @property
    def quantile(self):
        """Each latent's normaliser: its `q` quantile (normalized activation = act / this)."""
        return self.tensors[QUANTILE_KEY]

    @property
    def q(self) -> float:
        return float(self.meta.get("quantile", 0.999))


def read_latent_stats(folder: Path, hook: str | None = None) -> LatentStats:
    """Read `stats.safetensors` + `meta.json` of one hook's latents folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    stats, meta_path = folder / layout.LATENT_STATS, folder / layout.LATENT_META
    if not stats.is_file() or not meta_path.is_file():
        raise UserError(f"{folder} holds no complete latent statistics; run `safesail collect` first.")
    try:
        tensors = load_file(str(stats))
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise UserError(f"{folder} cannot be read ({e}); re-run `safesail collect`.") from None
    missing = [k for k in STATS_KEYS if k not in tensors]
    if missing:
        raise UserError(f"{stats} lacks {', '.join(missing)}; re-run `safesail collect`.")
    return LatentStats(hook=str(hook or meta.get("hook") or folder.name), tensors=tensors, meta=meta)


def write_latent_stats(folder: Path, tensors: dict, meta: dict) -> None:
    """Write one hook's stats (tensors first, meta.json last: a folder with meta.json is complete)."""
    folder = Path(folder)
    atomic_save_safetensors(folder / layout.LATENT_STATS, tensors)
    atomic_write_json(folder / layout.LATENT_META, meta)
