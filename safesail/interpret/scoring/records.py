"""`runs/<name>/interpret/scores.jsonl`: one record per (hook, latent, kind), written by `safesail score`.

Each line is one `ScoreRecord`: the latent (`hook`, `layer`, `latent`), the scorer
(`kind`: simulation | detection | fuzzing), its `value` (simulation: Pearson
correlation of simulated vs true activations; detection and fuzzing: balanced
accuracy), a bootstrap interval over the scored examples (`ci_low`, `ci_high`), the
controls (`control_shuffled`: the same scorer on another latent's explanation;
`control_constant`: the same scorer on one fixed, content-free explanation),
`beats_shuffled` (value > control_shuffled; null when either is missing), the
examples behind the value (`n_examples`), the cost of the own-explanation run
(`llm_calls`, `prompt_tokens`, `completion_tokens`; the controls' costs are in
`details.controls`), `status` ("ok" | "failed") with a named `failure`
("<code>: <detail>" or null), and kind-specific `details` (per-example predictions
and per-example status, AUROC, accuracy per activation level, the scorer's identity).

The file is append-only (`safesail.jsonl`): a killed run leaves at most a torn last
line, which readers skip; the last record per `ScoreRecord.key()` wins. Records of the
one-scorer format (before kinds: `score` instead of `value`) read as simulation records.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from safesail import layout
from safesail.jsonl import JsonlWriter, iter_jsonl

STATUSES = ("ok", "failed")
FILE_NAME = layout.SCORES
# Per-example status in details["examples"][i]["status"]: a re-run re-sends every "retryable" one.
EXAMPLE_STATUSES = ("ok", "retryable", "failed")


def _num(x) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class ScoreRecord:
    hook: str
    layer: int | None
    latent: int
    kind: str                              # a registered scorer (registry.scorer_kinds())
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    control_shuffled: float | None = None
    control_constant: float | None = None
    beats_shuffled: bool | None = None
    n_examples: int = 0
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: str = "ok"                     # one of STATUSES
    failure: str | None = None             # "<code>: <detail>" when status is "failed"
    details: dict = field(default_factory=dict)
    time: str = ""

    def __post_init__(self):
        from safesail.interpret.scoring.registry import scorer_kinds

        if self.kind not in scorer_kinds():
            raise ValueError(f"unknown score kind {self.kind!r}; one of {scorer_kinds()}")
        if self.status not in STATUSES:
            raise ValueError(f"unknown score status {self.status!r}; one of {STATUSES}")
        self.hook = str(self.hook)
        self.layer = None if self.layer is None else int(self.layer)
        self.latent = int(self.latent)
        for name in ("value", "ci_low", "ci_high", "control_shuffled", "control_constant"):
            setattr(self, name, _num(getattr(self, name)))
        self.beats_shuffled = None if self.beats_shuffled is None else bool(self.beats_shuffled)
        for name in ("n_examples", "llm_calls", "prompt_tokens", "completion_tokens"):
            setattr(self, name, int(getattr(self, name) or 0))
        self.failure = None if self.failure is None else str(self.failure)
        self.details = dict(self.details or {})
        self.time = self.time or time.strftime("%Y-%m-%dT%H:%M:%S")

    def key(self) -> tuple[str, int, str]:
        """What one record is about: a re-run replaces the record with the same key."""
        return (self.hook, self.latent, self.kind)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.value is not None

    @property
    def failure_code(self) -> str | None:
        return None if self.failure is None else self.failure.split(":", 1)[0]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, rec: dict) -> "ScoreRecord":
        if "value" not in rec and "score" in rec:  # the one-scorer format: a simulation record
            return _from_legacy(rec)
        names = cls.__dataclass_fields__
        return cls(**{k: rec[k] for k in names if k in rec})


_LEGACY_TOP = {"hook", "layer", "latent", "status", "score", "failure", "kind", "llm_calls", "prompt_tokens",
               "completion_tokens", "time"}


def _from_legacy(rec: dict) -> ScoreRecord:
    details = {k: v for k, v in rec.items() if k not in _LEGACY_TOP}
    details["format"] = "legacy"
    return ScoreRecord(hook=rec["hook"], layer=rec.get("layer"), latent=rec["latent"], kind="simulation",
                       value=rec.get("score"), n_examples=len(rec.get("segments") or []),
                       llm_calls=rec.get("llm_calls") or 0, prompt_tokens=rec.get("prompt_tokens") or 0,
                       completion_tokens=rec.get("completion_tokens") or 0,
                       status="ok" if rec.get("status") == "ok" else "failed", failure=rec.get("failure"),
                       details=details, time=rec.get("time") or "")


def scores_path(run_root: Path) -> Path:
    return Path(run_root) / "interpret" / FILE_NAME


def read_scores(path: Path, kinds: Iterable[str] | None = None) -> dict[tuple[str, int, str], ScoreRecord]:
    """The last complete record per (hook, latent, kind) of a scores file (file order otherwise).

    `kinds` keeps only those kinds. Lines that are not score records are skipped."""
    want = None if kinds is None else set(kinds)
    out: dict[tuple[str, int, str], ScoreRecord] = {}
    for rec in iter_jsonl(path):
        try:
            r = ScoreRecord.from_json(rec)
        except (KeyError, TypeError, ValueError):
            continue
        if want is not None and r.kind not in want:
            continue
        out.pop(r.key(), None)
        out[r.key()] = r
    return out


def scores_by_latent(path: Path) -> dict[tuple[str, int], dict[str, ScoreRecord]]:
    """{(hook, latent): {kind: record}}: every kind of each latent side by side."""
    out: dict[tuple[str, int], dict[str, ScoreRecord]] = {}
    for (hook, latent, kind), r in read_scores(path).items():
        out.setdefault((hook, latent), {})[kind] = r
    return out


class ScoreWriter(JsonlWriter):
    """Appends records to a scores file; each `write` is flushed (a crash loses at most one line)."""

    def write(self, rec: ScoreRecord) -> None:
        self.write_json(rec.to_json())
