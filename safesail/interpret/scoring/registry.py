"""The scorers by name (`score.scorers`): each entry builds one from the stage's settings.

A new scorer is a module with a class following `protocol.Scorer` and one line here.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from safesail.errors import UserError
from safesail.interpret.clients.base import LLMClient
from safesail.interpret.scoring.protocol import Scorer


def _simulation(client: LLMClient, sc: dict, sem, windows) -> Scorer:
    from safesail.interpret.scoring.simulation import SimulationScorer
    from safesail.interpret.scoring.simulator import Simulator

    sim = Simulator(client, sc["mode"], sc["max_value"], sc["json_tokens_per_token"])
    return SimulationScorer(sim, sc["granularity"], sc["segments_per_call"], sc["min_ok_fraction"], windows, sem)


def _detection(client: LLMClient, sc: dict, sem, windows) -> Scorer:
    from safesail.interpret.scoring.binary import BinaryJudge
    from safesail.interpret.scoring.detection import DetectionScorer
    from safesail.interpret.scoring.prompts.detection import TASK

    judge = BinaryJudge(client, TASK, sc["mode"], sc["detection"]["batch_size"], sem=sem)
    return DetectionScorer(judge, sc["min_ok_fraction"], sc["binary_metric"])


def _fuzzing(client: LLMClient, sc: dict, sem, windows) -> Scorer:
    from safesail.interpret.scoring.binary import BinaryJudge
    from safesail.interpret.scoring.fuzzing import FuzzingScorer
    from safesail.interpret.scoring.prompts.fuzzing import TASK

    judge = BinaryJudge(client, TASK, sc["mode"], sc["fuzzing"]["batch_size"], sem=sem)
    return FuzzingScorer(judge, sc["fuzzing"]["max_marks"], sc["min_ok_fraction"], sc["binary_metric"])


SCORERS: dict[str, Callable[..., Scorer]] = {"simulation": _simulation, "detection": _detection,
                                             "fuzzing": _fuzzing}


def check_names(names) -> list[str]:
    names = [str(n) for n in (names or [])]
    unknown = [n for n in names if n not in SCORERS]
    if unknown or not names:
        raise UserError(f"unknown or empty score.scorers {names!r}; choose from {', '.join(SCORERS)}, "
                        "e.g. score.scorers=[simulation,detection,fuzzing].")
    return list(dict.fromkeys(names))


def make_scorers(names, client: LLMClient, sc: dict, sem: asyncio.Semaphore | None = None,
                 windows: dict | None = None) -> dict[str, Scorer]:
    return {n: SCORERS[n](client, sc, sem, windows) for n in check_names(names)}
