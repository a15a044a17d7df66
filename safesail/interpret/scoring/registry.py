"""The scorers by name (`score.scorers`, the `kind` of a score record).

Every module of `safesail/interpret/scoring/` is imported once on first use; a scorer's module
registers a builder `(client, sc, sem, windows) -> Scorer` under `@register_scorer("<kind>")`,
so adding a scorer is one new file (docs/extending.md). `sc` is the typed `score` group as a dict.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from safesail.errors import UserError
from safesail.interpret.clients.base import LLMClient
from safesail.interpret.scoring.protocol import Scorer
from safesail.registry import Registry

_REGISTRY: Registry[Callable[..., Scorer]] = Registry("safesail.interpret.scoring", "scorers", skip_packages=True)
SCORERS: dict[str, Callable[..., Scorer]] = _REGISTRY.entries


def register_scorer(kind: str):
    """Decorator of a scorer's builder: `score.scorers=[..., <kind>]` runs it; its records carry `kind`."""
    def deco(build: Callable[..., Scorer]) -> Callable[..., Scorer]:
        return _REGISTRY.add(kind, build)
    return deco


def discover() -> None:
    """Import every module of safesail/interpret/scoring/ (once), so that each scorer registers."""
    _REGISTRY.discover()


def scorer_kinds() -> tuple[str, ...]:
    """The registered scorer names (the allowed `kind` of a score record)."""
    return tuple(_REGISTRY.names(sort=True))


def check_names(names) -> list[str]:
    names = [str(n) for n in (names or [])]
    kinds = scorer_kinds()
    unknown = [n for n in names if n not in kinds]
    if unknown or not names:
        raise UserError(f"unknown or empty score.scorers {names!r}; choose from {', '.join(kinds)}, "
                        "e.g. score.scorers=[simulation,detection,fuzzing].")
    return list(dict.fromkeys(names))


def make_scorers(names, client: LLMClient, sc: dict, sem: asyncio.Semaphore | None = None,
                 windows: dict | None = None) -> dict[str, Scorer]:
    return {n: SCORERS[n](client, sc, sem, windows) for n in check_names(names)}
