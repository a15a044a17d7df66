"""`runs/<name>/verify/effects.jsonl`: one record per causal-check result (written by `safesail verify`).

Each line is one `Effect`: which direction was tested (`target`: an SAE latent, the
difference-in-means reference or a random latent of the same norm; the residual-stream refusal
direction of `residual_direction.py` and its random control, `random_direction`), on which slice of
the queries (`domain`, `lang`, either may be null), which check (`output_effect`,
`necessity`, `sufficiency`, `refusal`), one named `metric` with its `value`, a bootstrap
interval (`ci_low`, `ci_high`; null where no interval applies), the number of items
behind it (`n`) and check-specific `details`. The neuron DB loads these records into its
`verify_effects` table and exports them to `export/verify.jsonl`.

The file is append-only (`safesail.jsonl`): a killed run leaves at most a torn last
line, which readers skip; the last record per `Effect.key()` wins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from safesail import layout
from safesail.jsonl import JsonlWriter, iter_jsonl

TARGETS = ("latent", "diff_in_means", "random_latent", "residual_direction", "random_direction")
CHECKS = ("output_effect", "necessity", "sufficiency", "refusal")
FILE_NAME = layout.EFFECTS


def _num(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Effect:
    hook: str
    layer: int
    latent: int | None          # SAE latent index; None for the diff-in-means reference direction
    target: str                 # one of TARGETS
    check: str                  # one of CHECKS
    metric: str
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int = 0
    domain: str | None = None
    lang: str | None = None
    details: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"unknown verify target {self.target!r}; one of {TARGETS}")
        if self.check not in CHECKS:
            raise ValueError(f"unknown verify check {self.check!r}; one of {CHECKS}")
        self.layer = int(self.layer)
        self.latent = None if self.latent is None else int(self.latent)
        self.value, self.ci_low, self.ci_high = _num(self.value), _num(self.ci_low), _num(self.ci_high)
        self.n = int(self.n)
        self.details = dict(self.details or {})

    def key(self) -> tuple:
        """What one result is about: a re-run replaces the record with the same key."""
        return (self.hook, self.latent, self.target, self.check, self.metric, self.domain, self.lang)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, rec: dict) -> "Effect":
        names = cls.__dataclass_fields__
        return cls(**{k: rec.get(k) for k in names if k in rec})


def effects_path(run_root: Path) -> Path:
    return Path(run_root) / layout.VERIFY_DIR / FILE_NAME


def read_effects(path: Path) -> list[Effect]:
    """Every complete record of an effects file, the last one per key kept (file order otherwise)."""
    out: dict[tuple, Effect] = {}
    for rec in iter_jsonl(path):
        try:
            e = Effect.from_json(rec)
        except (TypeError, ValueError):
            continue
        out.pop(e.key(), None)
        out[e.key()] = e
    return list(out.values())


def iter_effect_dicts(path: Path) -> Iterator[dict]:
    """The records as plain dicts (for loaders that store them as rows)."""
    for e in read_effects(path):
        yield e.to_json()


class EffectWriter(JsonlWriter):
    """Appends records to an effects file; each `write` is flushed (a crash loses at most one line)."""

    def write(self, effects: Iterable[Effect]) -> None:
        for e in effects:
            self.write_json(e.to_json())
