"""Detection and fuzzing: items, batches, figures and failures, with a test double that follows the explanation."""

from __future__ import annotations

import asyncio
import math

import pytest

from safesail.interpret.scoring import metrics
from safesail.interpret.scoring.binary import BinaryJudge
from safesail.interpret.scoring.controls import shuffled_partners
from safesail.interpret.scoring.detection import DetectionScorer, detection_items
from safesail.interpret.scoring.fuzzing import FuzzingScorer, fuzzing_items, true_marks
from safesail.interpret.scoring.prompts import binary as layout
from safesail.interpret.scoring.prompts.detection import TASK as DET
from safesail.interpret.scoring.prompts.fuzzing import TASK as FUZZ
from safesail.interpret.scoring.protocol import Example
from sim_fakes import FakeJudge


def _examples():
    ex = []
    for i in range(6):  # activating: the pizza token fires, at levels 0..5
        toks = ["We", " ate", " pizza", " at", " noon", "."] if i % 2 else ["The", " pizza", " was", " hot", "."]
        acts = [0.0] * len(toks)
        acts[toks.index(" pizza")] = 1.0 + i
        ex.append(Example(str(i), "activating", i, toks, acts))
    for i in range(6, 10):  # random negatives
        ex.append(Example(str(i), "random", None, ["A", " quiet", " road", "\n", " in", " May"], [0.0] * 6))
    return ex


def test_metrics():
    assert metrics.balanced_accuracy([True, True, False, False], [True, False, False, False]) == 0.75
    assert metrics.balanced_accuracy([True, True], [True, True]) is None
    assert metrics.auroc([True, False, True, False], [0.9, 0.1, 0.5, 0.5]) == pytest.approx(0.875)
    assert metrics.accuracy_by_level([0, 0, None], [True, True, False], [True, False, False]) == {
        "0": 0.5, "random": 1.0}
    lo, hi = metrics.bootstrap_interval(lambda idx: sum(idx) / len(idx), 10, 100, seed=1)
    assert lo < 4.5 < hi and metrics.bootstrap_interval(lambda idx: 1.0, 10, 100, seed=1) == (1.0, 1.0)
    assert metrics.bootstrap_interval(lambda idx: None, 10, 100) == (None, None)


def test_items_and_marks():
    ex = _examples()
    det = detection_items(ex)
    assert [it.label for it in det] == [True] * 6 + [False] * 4
    assert "\n" not in det[6].text and "\\n" in det[6].text  # one line per excerpt
    fz = fuzzing_items(ex, max_marks=3)
    assert len(fz) == 12 and sum(it.label for it in fz) == 6  # each activating segment right and fuzzed
    right = [it for it in fz if it.label]
    assert all("<<pizza>>" in it.text for it in right)
    assert all("<<pizza>>" not in it.text and it.text.count("<<") == 1 for it in fz if not it.label)
    assert true_marks([0, 3, 0, 5, 1], 2) == [1, 3]
    assert layout.render_excerpt(["a", "\t", " b "], {2}) == "a\\t <<b>>"


@pytest.mark.parametrize("logprobs", [True, False])
def test_detection_separates_own_from_shuffled(logprobs):
    client = FakeJudge(logprobs=logprobs)
    scorer = DetectionScorer(BinaryJudge(client, DET, "auto", batch_size=4))
    own = asyncio.run(scorer.score("mentions of pizza", _examples()))
    other = asyncio.run(scorer.score("names of rivers", _examples()))
    assert own.failure is None and own.value == 1.0 and own.cost.llm_calls == len(client.calls) // 2 == 3
    assert other.value == 0.5  # says no to everything: chance
    assert own.metrics["auroc"] == (1.0 if logprobs else None)
    assert own.metrics["accuracy_by_level"] == {**{str(i): 1.0 for i in range(6)}, "random": 1.0}
    assert own.resample([0, 0, 6, 6]) == 1.0
    assert [it.label for it in detection_items(_examples())].count(True) == own.metrics["n_positive"]


def test_fuzzing_needs_the_marks_on_the_right_tokens():
    client = FakeJudge(marked=True)
    scorer = FuzzingScorer(BinaryJudge(client, FUZZ, "logprobs", batch_size=12), max_marks=1)
    own = asyncio.run(scorer.score("pizza", _examples()))
    assert own.value == 1.0 and own.cost.llm_calls == 1 and own.metrics["auroc"] == 1.0
    assert asyncio.run(scorer.score("rivers", _examples())).value == 0.5


def test_failures_are_named_never_a_number():
    unparsable = FakeJudge(logprobs=False)
    unparsable.chat = _reply("I think yes")  # type: ignore[method-assign]
    run = asyncio.run(DetectionScorer(BinaryJudge(unparsable, DET, "json")).score("pizza", _examples()))
    assert run.value is None and run.failure.startswith("items_failed")
    assert all(it["failure"].startswith("unparsable_reply") and it["status"] == "failed" for it in run.items)
    short = FakeJudge(logprobs=False)
    short.chat = _reply('{"answers": [true]}')  # type: ignore[method-assign]
    run = asyncio.run(DetectionScorer(BinaryJudge(short, DET, "json")).score("pizza", _examples()))
    assert run.items[0]["failure"].startswith("count_mismatch")
    only_pos = [e for e in _examples() if e.kind == "activating"]
    run = asyncio.run(DetectionScorer(BinaryJudge(FakeJudge(), DET)).score("pizza", only_pos))
    assert run.value is None and run.failure.startswith("one_class")
    flaky = FakeJudge(fail_on="Excerpt")
    run = asyncio.run(DetectionScorer(BinaryJudge(flaky, DET)).score("pizza", _examples()))
    assert run.value is None and all(it["status"] == "retryable" for it in run.items)
    with pytest.raises(Exception):
        layout.parse_answers('{"answers": [true, "maybe"]}', 2)


def _reply(text):
    from safesail.interpret.clients.base import Completion

    async def chat(req):
        return Completion(text=text, model="fake", prompt_tokens=10, completion_tokens=3)

    return chat


def test_shuffled_partners_are_fixed_and_never_the_same_text():
    expls = {("h", i): {"status": "ok", "explanation": f"concept {i % 3}"} for i in range(7)}
    expls[("h", 9)] = {"status": "failed", "explanation": None}
    a, b = shuffled_partners(expls), shuffled_partners(dict(reversed(list(expls.items()))))
    assert a == b and ("h", 9) not in a
    for k, p in a.items():
        assert p is not None and p != k and expls[p]["explanation"] != expls[k]["explanation"]
    assert shuffled_partners({("h", 1): {"status": "ok", "explanation": "x"}}) == {("h", 1): None}


def test_a_batch_too_long_for_the_window_goes_in_halves():
    ex = _examples()
    items = detection_items(ex)
    client = FakeJudge()
    three, _ = layout.logprob_prompt(DET, "pizza", [it.text for it in items[:3]], layout.YES_NO)
    client.context_window = client.count_tokens(three) + 1  # 3 items fit, 10 do not
    run = asyncio.run(DetectionScorer(BinaryJudge(client, DET, "logprobs", batch_size=10)).score("pizza", ex))
    assert run.failure is None and run.value == 1.0 and run.cost.llm_calls == 4  # 10 -> 5 + 5 -> 2 + 3 each
    one, _ = layout.logprob_prompt(DET, "pizza", [items[0].text], layout.YES_NO)
    client.context_window = client.count_tokens(one) - 1  # not even one item fits: named, not sent
    run = asyncio.run(DetectionScorer(BinaryJudge(client, DET, "logprobs", batch_size=10)).score("pizza", ex))
    assert run.value is None and all(it["failure"].startswith("context_overflow") for it in run.items)


def test_auroc_as_the_value_is_not_flattened_by_a_yes_biased_judge():
    class YesBiased(FakeJudge):  # P(yes) above 0.5 everywhere, higher where the explanation applies
        async def prompt_logprobs(self, prompt, candidates, slots_ending_with=None):
            res = await super().prompt_logprobs(prompt, candidates)
            yes, no = candidates
            for lp in res.next_logprobs:
                hot = lp[yes] > lp[no]
                lp[yes], lp[no] = math.log(0.9 if hot else 0.6), math.log(0.1 if hot else 0.4)
            return res

    ex = _examples()
    ba = asyncio.run(DetectionScorer(BinaryJudge(YesBiased(), DET)).score("pizza", ex))
    au = asyncio.run(DetectionScorer(BinaryJudge(YesBiased(), DET), metric="auroc").score("pizza", ex))
    assert ba.value == 0.5 and ba.metrics["yes_rate"] == 1.0 and au.value == 1.0
    assert au.resample(list(range(len(au.items)))) == 1.0
    from safesail.errors import UserError

    with pytest.raises(UserError, match="log-probabilities"):
        DetectionScorer(BinaryJudge(FakeJudge(logprobs=False), DET), metric="auroc")
