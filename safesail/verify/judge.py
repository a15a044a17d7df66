"""The sufficiency judge: does a steered answer talk about the latent's explanation?

The judge is the `llm` group's client (the local explainer by default). Two questions:

- **absolute** (`judge-v3`): "is this text about <topic>?", one per (topic, answer). With a back
  end that gives prompt log-probabilities (the local one) the reply is read as the judge's
  probability of "yes" against "no" (`p_yes`; the verdict is p_yes > 0.5), so two answers to one
  query can be compared by their graded p_yes; otherwise the one-word reply (1.0 / 0.0);
- **paired** (`judge-pair-v2`, a `PairItem`): two answers to the SAME neutral query (the steered
  one and the random-latent control's, or the unsteered one), "which text is more about
  <topic>? A or B", asked in BOTH orders. The reply is the log-odds of "A" over "B"
  (or +-1 from a one-letter reply): with x first it is pref + bias, with x second -pref + bias,
  so their half-difference is the judge's preference for x with its position bias removed
  exactly, and their half-sum is that bias (reported). Validated on hand-made pairs
  (benchmarks/bench_verify_sufficiency.py --parts judge): a one-letter reply of the 1.5B judge
  was "A" for every pair in either order, a preference read from both orders was not.

Replies are cached like every other LLM call. The question comes before the text(s), so requests
about one topic share all of their prompt but the texts (the local back end computes a shared
prefix once); a request is one prefill, no decoding.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass

from safesail.interpret.clients.base import ChatRequest, LLMError

PROMPT_VERSION = "judge-v3"
PAIR_PROMPT_VERSION = "judge-pair-v2"
SYSTEM = ("You check whether a short text is about a given topic. Reply with one word: yes or no.")
PAIR_SYSTEM = ("You compare two short texts and decide which one is more about a given topic. "
               "Reply with one letter: A or B.")
_WORD = re.compile(r"[a-zA-Z]+")
MAX_CHARS = 600
YES, NO = ("yes", "Yes", "YES"), ("no", "No", "NO")


@dataclass(frozen=True)
class PairItem:
    """Ask which of two texts is more about `topic`; `first_is_x`: x is shown as text A."""
    topic: str
    x: str
    y: str
    first_is_x: bool


def _clean(text: str) -> str:
    return " ".join(str(text).split())[:MAX_CHARS] or "(empty)"


def judge_messages(topic: str, text: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Topic: {topic}\nIs the following text about the topic? Answer yes or no.\n"
                                        f"Text: {_clean(text)}"}]


def pair_messages(topic: str, first: str, second: str) -> list[dict]:
    return [{"role": "system", "content": PAIR_SYSTEM},
            {"role": "user", "content": f"Topic: {topic}\nWhich text is more about the topic? Answer A or B.\n"
                                        f"Text A: {_clean(first)}\nText B: {_clean(second)}"}]


def parse_verdict(reply: str) -> bool | None:
    m = _WORD.search(reply or "")
    if not m:
        return None
    w = m.group(0).lower()
    return True if w == "yes" else False if w == "no" else None


def parse_choice(reply: str) -> str | None:
    """"A" or "B" from a reply ("A", "B.", "Text B", "**A**"); None for anything else."""
    words = [w.upper() for w in _WORD.findall(reply or "")]
    if words[:1] == ["TEXT"]:
        words = words[1:]
    return words[0] if words and words[0] in ("A", "B") else None


def debiased(d_x_first: float, d_y_first: float) -> tuple[float, float]:
    """(preference for x, position bias) from the A-over-B log-odds of the two orders."""
    return (d_x_first - d_y_first) / 2, (d_x_first + d_y_first) / 2


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` vs `losses` under a fair coin (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _lse(d: dict, names) -> float:
    vals = [d[n] for n in names if n in d]
    if not vals:
        return -math.inf
    m = max(vals)
    return m + math.log(sum(math.exp(v - m) for v in vals)) if m > -math.inf else -math.inf


async def _logprob_reply(client, msgs: list[dict], cands: list[str]) -> dict[str, float] | None:
    text = client.chat_prompt(msgs) if getattr(client, "supports_prompt_logprobs", False) else None
    if text is None:
        return None
    res = await client.prompt_logprobs(text, cands, slots_ending_with="\n")
    return res.next_logprobs[-1] if res.next_logprobs else None


async def _one(client, item) -> float | None:
    pair = isinstance(item, PairItem)
    if pair:
        first, second = (item.x, item.y) if item.first_is_x else (item.y, item.x)
        msgs = pair_messages(item.topic, first, second)
    else:
        msgs = judge_messages(*item)
    try:
        lp = await _logprob_reply(client, msgs, ["A", "B"] if pair else [*YES, *NO])
        if lp:
            a, b = (_lse(lp, ["A"]), _lse(lp, ["B"])) if pair else (_lse(lp, YES), _lse(lp, NO))
            if math.isfinite(a) or math.isfinite(b):
                d = a - b if math.isfinite(a) and math.isfinite(b) else (math.inf if math.isfinite(a) else -math.inf)
                return max(-50.0, min(50.0, d)) if pair else 1 / (1 + math.exp(-max(-50.0, min(50.0, d))))
        comp = await client.chat(ChatRequest(messages=msgs, max_tokens=1, temperature=0.0))
    except LLMError:
        return None
    if pair:
        c = parse_choice(comp.text)
        return None if c is None else (1.0 if c == "A" else -1.0)
    v = parse_verdict(comp.text)
    return None if v is None else float(v)


def judge_many(loop: asyncio.AbstractEventLoop, client, items: list) -> list[float | None]:
    """A reply for each item, all requests at once (the client batches them): for a (topic, text) the
    judge's p(yes) (1.0 / 0.0 from a text reply; None: unparsable or an LLM error); for a `PairItem`
    the log-odds of "A" over "B" (+-1 from a text reply)."""
    async def run():
        return await asyncio.gather(*[_one(client, it) for it in items])
    return list(loop.run_until_complete(run()))
