"""The detection scorer: does the explanation pick out the latent's activating segments?

The LLM sees every score segment whole (activating ones from every activation level and
the random negatives, shuffled together in batches of `batch_size`) and answers, per
segment, whether the explanation applies. Value: balanced accuracy; details: AUROC
(where the back end returns logprobs), accuracy per activation level (`binary`).
"""

from __future__ import annotations

import time

from safesail.interpret.scoring.binary import BinaryJudge, Item, batch_order, binary_run, check_metric
from safesail.interpret.scoring.prompts import binary as layout
from safesail.interpret.scoring.protocol import Example, ScorerRun
from safesail.interpret.scoring.registry import register_scorer


def detection_items(examples: list[Example]) -> list[Item]:
    return [Item(e.segment_id, e.level if e.activating else None, e.activating, layout.render_excerpt(e.tokens))
            for e in examples]


class DetectionScorer:
    kind = "detection"

    def __init__(self, judge: BinaryJudge, min_ok_fraction: float = 1.0, metric: str = "balanced_accuracy"):
        self.judge = judge
        self.min_ok_fraction = float(min_ok_fraction)
        self.metric = check_metric(metric, judge)

    def identity(self) -> dict:
        return {**self.judge.identity(), "min_ok_fraction": self.min_ok_fraction, "metric": self.metric}

    async def score(self, explanation: str, examples: list[Example]) -> ScorerRun:
        t0 = time.perf_counter()
        items = batch_order(detection_items(examples))
        answers, cost = await self.judge.judge(explanation, items)
        return binary_run(items, answers, cost, t0, self.min_ok_fraction, self.metric)


@register_scorer("detection")
def build(client, sc: dict, sem, windows) -> DetectionScorer:
    from safesail.interpret.scoring.prompts.detection import TASK

    judge = BinaryJudge(client, TASK, sc["mode"], sc["detection"]["batch_size"], sem=sem)
    return DetectionScorer(judge, sc["min_ok_fraction"], sc["binary_metric"])
