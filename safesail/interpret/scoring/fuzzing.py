"""The fuzzing scorer: are the marked tokens the ones the explanation is about?

Every activating score segment is shown twice: once with its most active tokens marked
(up to `max_marks` tokens with activation > 0, highest first: the right answer is yes),
and once with the same number of marks on other tokens of the segment, drawn with a
fixed seed (the right answer is no). Random segments are not used: their marks could only
be wrong. Items are shuffled into batches of `batch_size`. Value: balanced accuracy;
details: AUROC (logprobs back ends), accuracy per activation level (`binary`).
"""

from __future__ import annotations

import hashlib
import random
import time

from safesail.interpret.scoring.binary import BinaryJudge, Item, batch_order, binary_run, check_metric
from safesail.interpret.scoring.prompts import binary as layout
from safesail.interpret.scoring.protocol import Example, ScorerRun
from safesail.interpret.scoring.registry import register_scorer


def true_marks(acts: list[float], max_marks: int) -> list[int]:
    hot = sorted((i for i, a in enumerate(acts) if a > 0), key=lambda i: (-acts[i], i))
    return sorted(hot[:max_marks])


def fuzzed_marks(n_tokens: int, correct: list[int], seed_text: str) -> list[int] | None:
    """As many marks as `correct`, on tokens outside it (None when there are not enough such tokens)."""
    free = [i for i in range(n_tokens) if i not in set(correct)]
    if len(free) < len(correct) or not correct:
        return None
    rng = random.Random(int(hashlib.sha256(seed_text.encode()).hexdigest()[:12], 16))
    return sorted(rng.sample(free, len(correct)))


def fuzzing_items(examples: list[Example], max_marks: int = 3) -> list[Item]:
    items = []
    for e in examples:
        if not e.activating:
            continue
        right = true_marks(e.acts, max_marks)
        wrong = fuzzed_marks(len(e.tokens), right, f"fuzz|{e.segment_id}")
        items.append(Item(f"{e.segment_id}+", e.level, True, layout.render_excerpt(e.tokens, set(right)),
                          {"marks": right}))
        if wrong is not None:
            items.append(Item(f"{e.segment_id}-", e.level, False, layout.render_excerpt(e.tokens, set(wrong)),
                              {"marks": wrong}))
    return items


class FuzzingScorer:
    kind = "fuzzing"

    def __init__(self, judge: BinaryJudge, max_marks: int = 3, min_ok_fraction: float = 1.0,
                 metric: str = "balanced_accuracy"):
        self.judge = judge
        self.max_marks = max(1, int(max_marks))
        self.min_ok_fraction = float(min_ok_fraction)
        self.metric = check_metric(metric, judge)

    def identity(self) -> dict:
        return {**self.judge.identity(), "max_marks": self.max_marks, "min_ok_fraction": self.min_ok_fraction,
                "metric": self.metric}

    async def score(self, explanation: str, examples: list[Example]) -> ScorerRun:
        t0 = time.perf_counter()
        items = batch_order(fuzzing_items(examples, self.max_marks))
        answers, cost = await self.judge.judge(explanation, items)
        return binary_run(items, answers, cost, t0, self.min_ok_fraction, self.metric)


@register_scorer("fuzzing")
def build(client, sc: dict, sem, windows) -> FuzzingScorer:
    from safesail.interpret.scoring.prompts.fuzzing import TASK

    judge = BinaryJudge(client, TASK, sc["mode"], sc["fuzzing"]["batch_size"], sem=sem)
    return FuzzingScorer(judge, sc["fuzzing"]["max_marks"], sc["min_ok_fraction"], sc["binary_metric"])
