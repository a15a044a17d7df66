"""The simulation scorer: the LLM predicts the latent's activation on every token from the explanation.

Value = Pearson correlation of simulated vs true activations over all tokens of the
latent's score segments (activating and random together; `correlation.score_segments`),
the `correlation_score` of the Safe-SAIL export. The simulator (`simulator.Simulator`)
reads log-probabilities all at once or asks for JSON, `segments_per_call` segments per call. `granularity=query` simulates each segment inside
its whole source document (`windows.window_lookup`); segments of one document share a call.
"""

from __future__ import annotations

import asyncio
import time

from safesail.errors import UserError
from safesail.interpret.scoring.correlation import ScoreUndefined, SegmentSim, pearson, score_segments
from safesail.interpret.scoring.inputs import WindowLookup
from safesail.interpret.scoring.protocol import Cost, Example, ScorerRun, gate, item_status
from safesail.interpret.scoring.registry import register_scorer
from safesail.interpret.scoring.prompts.simulation import STYLES
from safesail.interpret.scoring.simulator import Simulator

GRANULARITIES = ("segment", "query")
# prompt styles (in the prompt version) under which a character split over tokens is shown once
# (`shown_units`); v1 shows every token, its empty pieces as the empty-token sign
JOIN_SPLIT_CHARACTERS = frozenset(s for s in STYLES if s != "v1")


class SimulationScorer:
    kind = "simulation"

    def __init__(self, simulator: Simulator, granularity: str = "segment", segments_per_call: int = 1,
                 min_ok_fraction: float = 1.0, windows: dict[str, WindowLookup] | None = None,
                 sem: asyncio.Semaphore | None = None):
        if granularity not in GRANULARITIES:
            raise UserError(f"unknown score.granularity {granularity!r}; use segment or query.")
        if granularity == "query" and windows is None:
            raise UserError("score.granularity=query needs the segments' source windows, which this run does not "
                            "provide; use score.granularity=segment.")
        self.sim = simulator
        self.granularity = granularity
        self.segments_per_call = max(1, int(segments_per_call))
        self.min_ok_fraction = float(min_ok_fraction)
        self.windows = windows or {}
        self.sem = gate(sem)

    def identity(self) -> dict:
        return {"llm": self.sim.client.model_name, "mode": self.sim.mode, "prompt_version": self.sim.prompt_version,
                "scale_max": self.sim.scale_max, "granularity": self.granularity,
                "segments_per_call": self.segments_per_call,
                "min_ok_fraction": self.min_ok_fraction}

    async def score(self, explanation: str, examples: list[Example]) -> ScorerRun:
        t0 = time.perf_counter()
        sims = [SegmentSim(e.segment_id, e.kind, list(e.tokens), list(e.acts)) for e in examples]
        cost = Cost()
        if self.granularity == "segment":
            await self._by_segment(explanation, sims, cost)
        else:
            await self._by_query(explanation, sims, examples, cost)
        ls = score_segments(sims, self.min_ok_fraction)
        items = []
        for s, e in zip(sims, examples):
            item = s.as_record()
            item.update(level=e.level, status=item_status(s.failure))
            items.append(item)
        return ScorerRun(ls.score, ls.failure, items, len(sims), cost,
                         {"n_tokens": ls.n_tokens, "mode": self.sim.mode, "granularity": self.granularity,
                          "scale_max": self.sim.scale_max}, _resampler(sims), time.perf_counter() - t0)

    async def _by_segment(self, explanation: str, sims: list[SegmentSim], cost: Cost) -> None:
        n = self.segments_per_call
        groups = [sims[i:i + n] for i in range(0, len(sims), n)]

        join = self.sim.style in JOIN_SPLIT_CHARACTERS
        units = {id(s): shown_units(s.tokens) if join else (s.tokens, list(range(len(s.tokens)))) for s in sims}

        async def run(group: list[SegmentSim]):
            async with self.sem:
                return await self.sim.simulate_many(explanation, [units[id(s)][0] for s in group])

        for group, results in zip(groups, await asyncio.gather(*(run(g) for g in groups))):
            for s, res in zip(group, results):
                owner = units[id(s)][1]
                s.pred = None if res.pred is None else [res.pred[o] for o in owner]
                s.failure = res.failure
                cost.add(res)

    async def _by_query(self, explanation: str, sims: list[SegmentSim], examples: list[Example], cost: Cost) -> None:
        placed, windows = [], {}
        for s, e in zip(sims, examples):
            lookup = self.windows.get(str(e.source.get("hook")))
            if lookup is None:
                raise UserError(f"no source windows for hook {e.source.get('hook')!r}; use score.granularity=segment.")
            wtoks, off = lookup(e.source)
            windows[tuple(wtoks)] = list(wtoks)
            placed.append((s, tuple(wtoks), off))

        async def run(tokens: list[str]):
            async with self.sem:
                return await self.sim.simulate(explanation, tokens)

        keys = list(windows)
        results = dict(zip(keys, await asyncio.gather(*(run(windows[k]) for k in keys))))
        for res in results.values():
            cost.add(res)
        for s, key, off in placed:
            res = results[key]
            if windows[key][off:off + len(s.tokens)] != s.tokens:
                s.failure = "token_mismatch: the source window does not hold the segment at its offset"
            elif res.failure:
                s.failure = res.failure
            else:
                s.pred = res.pred[off:off + len(s.tokens)]


def shown_units(tokens: list[str]) -> tuple[list[str], list[int]]:
    """The segment as the simulator is shown it, and the unit each token belongs to.

    A token that ends inside a character has the empty piece ("": collect's `token_pieces`; its
    character comes whole with the token that completes it); on its own line it would read as
    nothing. It is shown joined to the following tokens up to the first non-empty one, and every
    token of a unit gets the unit's prediction, so the scored tokens stay the segment's."""
    units: list[str] = []
    owner: list[int] = []
    pending = 0
    for tok in tokens:
        owner.append(len(units))
        if tok == "":
            pending += 1
            continue
        units.append(tok)
        pending = 0
    if pending:  # a segment cut inside a character: its last empty pieces are one unit of their own
        units.append("")
    return units, owner


def _resampler(sims: list[SegmentSim]):
    def value_of(idx: list[int]) -> float | None:
        ok = [sims[i] for i in idx if sims[i].pred is not None and sims[i].failure is None]
        try:
            return pearson([v for s in ok for v in s.true], [v for s in ok for v in s.pred])
        except ScoreUndefined:
            return None

    return value_of


@register_scorer("simulation")
def build(client, sc: dict, sem, windows) -> SimulationScorer:
    sim = Simulator(client, sc["mode"], sc["max_value"], sc["json_tokens_per_token"], sc["prompt_style"])
    return SimulationScorer(sim, sc["granularity"], sc["segments_per_call"], sc["min_ok_fraction"], windows, sem)
