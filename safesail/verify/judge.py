"""The sufficiency judge: does a steered answer talk about the latent's explanation?

The judge is the `llm` group's client (the local explainer by default). One yes/no
question per (explanation, answer); a reply that starts with neither counts as "no"
and is counted in `unparsed`. Replies are cached like every other LLM call.

The question comes before the text, so every request about one topic shares all of its
prompt but the text (the local back end computes a shared prefix once), and the reply is
one token (the verdict word), so a request costs the text's tokens and no decoding steps.
"""

from __future__ import annotations

import asyncio
import re

from safesail.interpret.clients.base import ChatRequest, LLMError

PROMPT_VERSION = "judge-v2"
SYSTEM = ("You check whether a short text is about a given topic. Reply with one word: yes or no.")
_WORD = re.compile(r"[a-zA-Z]+")


def judge_messages(topic: str, text: str) -> list[dict]:
    text = " ".join(str(text).split())[:600] or "(empty)"
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Topic: {topic}\nIs the following text about the topic? Answer yes or no.\n"
                                        f"Text: {text}"}]


def parse_verdict(reply: str) -> bool | None:
    m = _WORD.search(reply or "")
    if not m:
        return None
    w = m.group(0).lower()
    return True if w == "yes" else False if w == "no" else None


async def _one(client, topic: str, text: str) -> bool | None:
    try:
        comp = await client.chat(ChatRequest(messages=judge_messages(topic, text), max_tokens=1, temperature=0.0))
    except LLMError:
        return None
    return parse_verdict(comp.text)


def judge_many(loop: asyncio.AbstractEventLoop, client, items: list[tuple[str, str]]) -> list[bool | None]:
    """A verdict for each (topic, text) (None: unparsable reply or LLM error), all requests at once (the
    client batches them)."""
    async def run():
        return await asyncio.gather(*[_one(client, topic, t) for topic, t in items])
    return list(loop.run_until_complete(run()))
