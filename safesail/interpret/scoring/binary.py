"""The yes/no judge behind detection and fuzzing: batches of excerpts, one answer each, and their figures.

`BinaryJudge.judge(explanation, items)` sends the items in batches of `batch_size` (one
call per batch; a batch too long for the context window is sent as two halves, down to one
item). With prompt log-probabilities (`mode=logprobs`) it reads P(yes) vs P(no)
at every excerpt's answer slot in one forward pass (prediction: P(yes) >= 0.5; AUROC from
P(yes)); in `json` mode it asks for `{"answers": [...]}` (no AUROC). `binary_run` turns
the answers into a `ScorerRun`: value = balanced accuracy over the answered items,
AUROC, accuracy per activation level, and the resampler for the bootstrap.

Latent-level failures: `no_score_segments` (nothing to ask), `one_class` (the items are
all positives or all negatives: balanced accuracy is undefined), `items_failed` (fewer
than `min_ok_fraction` of the items were answered; the items say why).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from dataclasses import dataclass, field

from safesail.interpret.clients.base import ChatRequest, LLMClient, LLMError
from safesail.interpret.scoring import metrics
from safesail.interpret.scoring.prompts import binary as prompts
from safesail.interpret.scoring.prompts.simulation import SEPARATOR
from safesail.interpret.scoring.protocol import Cost, ScorerRun, gate, item_status
from safesail.interpret.scoring.simulator import SimulationFailure, choose_mode, find_slots

BINARY_FAILURES = {
    "no_score_segments": "the collect stage left no held-out segments to ask about",
    "one_class": "the items are all positives or all negatives, so balanced accuracy is undefined",
    "items_failed": "too many items could not be answered (their reasons are in details.items)",
}


@dataclass
class Item:
    """One excerpt to answer yes/no about, with the right answer."""
    id: str
    level: int | None
    label: bool
    text: str
    extra: dict = field(default_factory=dict)


def batch_order(items: list[Item]) -> list[Item]:
    """The items in a fixed shuffled order (positives and negatives mixed in every batch)."""
    seed = int(hashlib.sha256("|".join(it.id for it in items).encode()).hexdigest()[:12], 16)
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


class BinaryJudge:
    def __init__(self, client: LLMClient, task: prompts.Task, mode: str = "auto", batch_size: int = 8,
                 max_reply_tokens: int = 16, sem: asyncio.Semaphore | None = None):
        self.client = client
        self.task = task
        self.mode = choose_mode(client, mode)
        self.batch_size = max(1, int(batch_size))
        self.max_reply_tokens = int(max_reply_tokens)
        self.sem = gate(sem)
        self.words = answer_words(client) if self.mode == "logprobs" else (prompts.YES, prompts.NO)

    def identity(self) -> dict:
        return {"llm": self.client.model_name, "mode": self.mode, "prompt_version": self.task.version,
                "answers": list(self.words), "batch_size": self.batch_size}

    async def judge(self, explanation: str, items: list[Item]) -> tuple[list[dict], Cost]:
        """Per item (in the given order): {"p_yes", "pred", "failure"}; and the calls' cost."""
        cost = Cost()
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

        async def run(batch):
            async with self.sem:
                if self.mode == "logprobs":
                    return await self._logprobs(explanation, [it.text for it in batch], cost)
                return await self._json(explanation, [it.text for it in batch], cost)

        out = []
        for answers in await asyncio.gather(*(run(b) for b in batches)):
            out.extend(answers)
        return out, cost

    async def _logprobs(self, explanation: str, texts: list[str], cost: Cost) -> list[dict]:
        prompt, n_before = prompts.logprob_prompt(self.task, explanation, texts, self.words)
        n_prompt = self.client.count_tokens(prompt)
        if n_prompt >= self.client.context_window:
            if len(texts) > 1:  # a batch too long for the window goes as two halves
                half = len(texts) // 2
                return (await self._logprobs(explanation, texts[:half], cost)
                        + await self._logprobs(explanation, texts[half:], cost))
            return _all_failed(texts, f"context_overflow: {n_prompt} prompt tokens, window "
                                      f"{self.client.context_window}")
        try:
            res = await self.client.prompt_logprobs(prompt, list(self.words), slots_ending_with=SEPARATOR)
        except LLMError as e:
            cost.llm_calls += 1
            return _all_failed(texts, f"llm_error: {e.reason} {e.message}".strip())
        cost.add(Cost(1, int(bool(res.cached)), res.prompt_tokens, 0))
        try:
            slots = find_slots(res.tokens, n_before, len(texts))
        except SimulationFailure as f:
            return _all_failed(texts, str(f))
        out = []
        for i in slots:
            lp = res.next_logprobs[i]
            y, n = lp.get(self.words[0]), lp.get(self.words[1])
            if y is None or n is None or not (math.isfinite(y) and math.isfinite(n)):
                out.append({"p_yes": None, "pred": None,
                            "failure": "logprobs_missing: no probability for both yes and no at the answer"})
                continue
            p = 1.0 / (1.0 + math.exp(n - y))
            out.append({"p_yes": round(p, 6), "pred": p >= 0.5, "failure": None})
        return out

    async def _json(self, explanation: str, texts: list[str], cost: Cost) -> list[dict]:
        messages = prompts.json_messages(self.task, explanation, texts)
        max_tokens = self.max_reply_tokens + 8 * len(texts)
        n_prompt = self.client.count_message_tokens(messages)
        if n_prompt + max_tokens > self.client.context_window:
            if len(texts) > 1:
                half = len(texts) // 2
                return (await self._json(explanation, texts[:half], cost)
                        + await self._json(explanation, texts[half:], cost))
            return _all_failed(texts, f"context_overflow: {n_prompt} prompt + {max_tokens} reply tokens, window "
                                      f"{self.client.context_window}")
        req = ChatRequest(messages=messages, max_tokens=max_tokens, temperature=0.0,
                          json_schema=prompts.json_schema(len(texts)))
        try:
            comp = await self.client.chat(req)
        except LLMError as e:
            cost.llm_calls += 1
            return _all_failed(texts, f"llm_error: {e.reason} {e.message}".strip())
        cost.add(Cost(1, int(bool(comp.cached)), comp.prompt_tokens, comp.completion_tokens))
        try:
            answers = prompts.parse_answers(comp.text, len(texts))
        except SimulationFailure as f:
            return _all_failed(texts, str(f), raw=(comp.text or "")[:500])
        return [{"p_yes": None, "pred": a, "failure": None} for a in answers]


def answer_words(client: LLMClient) -> tuple[str, str]:
    """" yes"/" no" when both are one token of the back end's tokenizer (their probability is then
    read exactly), else the digits 1/0 (one token in every tokenizer that splits numbers into digits)."""
    if client.count_tokens(prompts.YES) == 1 and client.count_tokens(prompts.NO) == 1:
        return prompts.YES, prompts.NO
    return prompts.DIGITS


def check_metric(metric: str, judge: BinaryJudge) -> str:
    from safesail.errors import UserError

    if metric not in METRICS:
        raise UserError(f"unknown score.binary_metric {metric!r}; use balanced_accuracy or auroc.")
    if metric == "auroc" and judge.mode != "logprobs":
        raise UserError(f"score.binary_metric=auroc needs prompt log-probabilities, which the {judge.client.model_name!r} "
                        "back end does not return here; use score.binary_metric=balanced_accuracy.")
    return metric


def _all_failed(texts: list[str], failure: str, raw: str | None = None) -> list[dict]:
    out = [{"p_yes": None, "pred": None, "failure": failure} for _ in texts]
    if raw is not None and out:
        out[0]["raw"] = raw
    return out


METRICS = ("balanced_accuracy", "auroc")


def binary_run(items: list[Item], answers: list[dict], cost: Cost, t0: float,
               min_ok_fraction: float = 1.0, metric: str = "balanced_accuracy") -> ScorerRun:
    """The value (`metric`: balanced accuracy at P(yes) = 0.5, or AUROC of P(yes)), the other figures,
    accuracy per level, from the judged items."""
    recs = []
    for it, a in zip(items, answers):
        rec = {"id": it.id, "level": it.level, "label": it.label, "text": it.text, **it.extra, **a,
               "status": item_status(a.get("failure"))}
        recs.append(rec)
    seconds = time.perf_counter() - t0
    if not items:
        return ScorerRun(None, "no_score_segments: no items to ask about", recs, 0, cost, {}, None, seconds)
    ok = [r for r in recs if r["status"] == "ok"]
    fig = _figures(ok)
    resample = _resampler(recs, metric)
    if len(ok) < min_ok_fraction * len(recs) - 1e-9:
        first = next(r for r in recs if r["status"] != "ok")
        return ScorerRun(None, f"items_failed: {len(recs) - len(ok)} of {len(recs)} items failed (first, "
                               f"{first['id']}: {first['failure']})", recs, len(ok), cost, fig, resample, seconds)
    if fig[metric] is None:
        return ScorerRun(None, f"one_class: the {len(ok)} answered items have one label", recs, len(ok), cost,
                         fig, resample, seconds)
    return ScorerRun(fig[metric], None, recs, len(ok), cost, fig, resample, seconds)


def _figures(ok: list[dict]) -> dict:
    labels = [r["label"] for r in ok]
    preds = [bool(r["pred"]) for r in ok]
    probs = [r["p_yes"] for r in ok]
    has_p = bool(ok) and all(p is not None for p in probs)
    return {"balanced_accuracy": metrics.balanced_accuracy(labels, preds),
            "auroc": metrics.auroc(labels, probs) if has_p else None,
            "accuracy_by_level": metrics.accuracy_by_level([r["level"] for r in ok], labels, preds),
            "yes_rate": (sum(preds) / len(preds)) if preds else None,
            "n_positive": sum(labels), "n_negative": len(labels) - sum(labels)}


def _resampler(recs: list[dict], metric: str = "balanced_accuracy"):
    def value_of(idx: list[int]) -> float | None:
        ok = [recs[i] for i in idx if recs[i]["status"] == "ok"]
        if metric == "auroc":
            return metrics.auroc([r["label"] for r in ok], [r["p_yes"] for r in ok])
        return metrics.balanced_accuracy([r["label"] for r in ok], [bool(r["pred"]) for r in ok])

    return value_of
