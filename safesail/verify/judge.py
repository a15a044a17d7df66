"""The sufficiency judge: does a steered answer talk about the latent's explanation?

The judge is the `llm` group's client (the local explainer by default). One yes/no
question per (explanation, answer); a reply that starts with neither counts as "no"
and is counted in `unparsed`. Replies are cached like every other LLM call.
"""

from __future__ import annotations

import asyncio
import re

from safesail.interpret.clients.base import ChatRequest, LLMError

PROMPT_VERSION = "judge-v1"
SYSTEM = ("You check whether a short text is about a given topic. Reply with one word: yes or no.")
_WORD = re.compile(r"[a-zA-Z]+")


def judge_messages(topic: str, text: str) -> list[dict]:
    text = " ".join(str(text).split())[:600] or "(empty)"
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Topic: {topic}\nText: {text}\nIs the text about the topic? "
                                        "Answer yes or no."}]


def parse_verdict(reply: str) -> bool | None:
    m = _WORD.search(reply or "")
    if not m:
        return None
    w = m.group(0).lower()
    return True if w == "yes" else False if w == "no" else None


async def _one(client, topic: str, text: str) -> bool | None:
    try:
        comp = await client.chat(ChatRequest(messages=judge_messages(topic, text), max_tokens=3, temperature=0.0))
    except LLMError:
        return None
    return parse_verdict(comp.text)


def judge_many(loop: asyncio.AbstractEventLoop, client, topic: str, texts: list[str]) -> list[bool | None]:
    """Verdicts for each text (None: unparsable reply or LLM error), concurrently."""
    async def run():
        return await asyncio.gather(*[_one(client, topic, t) for t in texts])
    return list(loop.run_until_complete(run()))
