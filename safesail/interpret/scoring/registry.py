"""The scorers by name (`score.scorers`, the `kind` of a score record).

Every module of `safesail/interpret/scoring/` is imported once on first use; a scorer's module
registers a builder `(client, sc, sem, windows) -> Scorer` under `@register_scorer("<kind>")`,
so adding a scorer is one new file (docs/extending.md). `sc` is the typed `score` group as a dict.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from typing import Callable

from safesail.errors import UserError
from safesail.interpret.clients.base import LLMClient
from safesail.interpret.scoring.protocol import Scorer

SCORERS: dict[str, Callable[..., Scorer]] = {}
_discovered = False


def register_scorer(kind: str):
    """Decorator of a scorer's builder: `score.scorers=[..., <kind>]` runs it; its records carry `kind`."""
    def deco(build: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if kind in SCORERS and SCORERS[kind] is not build:
            raise TypeError(f"two scorers are named {kind!r}")
        SCORERS[kind] = build
        return build
    return deco


def discover() -> None:
    """Import every module of safesail/interpret/scoring/ (once), so that each scorer registers."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from safesail.interpret import scoring

    for m in sorted(pkgutil.iter_modules(scoring.__path__), key=lambda m: m.name):
        if not m.ispkg:
            importlib.import_module(f"safesail.interpret.scoring.{m.name}")


def scorer_kinds() -> tuple[str, ...]:
    """The registered scorer names (the allowed `kind` of a score record)."""
    discover()
    return tuple(sorted(SCORERS))


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
