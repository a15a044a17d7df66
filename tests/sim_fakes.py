"""Test doubles for the simulator's LLM client (unit tests of the code around the real back ends)."""

from __future__ import annotations

import json
import math
import re

from safesail.interpret.clients.base import ChatRequest, Completion, LLMClient, PromptLogprobs

_PIECES = re.compile(r"\t|\n|\d|[^\t\n\d]+")


class FakeClient(LLMClient):
    """Tokenises on TAB / newline / single digits; "fires" on tokens containing a keyword.

    `prompt_logprobs` puts most probability on `scale_max` after the TAB of a line whose
    token holds the keyword, on 0 elsewhere. `chat` answers with `reply` (a string or a
    function of the request) or, by default, a valid JSON prediction.
    """

    def __init__(self, keyword: str = "pizza", logprobs: bool = True, reply=None, window: int = 100_000):
        self.model_name = "fake-sim"
        self.supports_prompt_logprobs = logprobs
        self.context_window = window
        self.keyword = keyword
        self.reply = reply
        self.calls: list[tuple[str, object]] = []

    def count_tokens(self, text: str) -> int:
        return len(_PIECES.findall(text))

    async def prompt_logprobs(self, prompt: str, candidates: list[str]) -> PromptLogprobs:
        self.calls.append(("prompt_logprobs", prompt))
        toks = _PIECES.findall(prompt)
        top = max(int(c) for c in candidates)
        nxt = []
        line = ""
        for t in toks:
            if t == "\n":
                line = ""
            elif t != "\t":
                line += t
            hot = t == "\t" and self.keyword in line
            nxt.append({c: (math.log(0.9) if int(c) == (top if hot else 0) else math.log(0.1 / top))
                        for c in candidates})
        return PromptLogprobs(tokens=toks, next_logprobs=nxt, prompt_tokens=len(toks))

    async def chat(self, req: ChatRequest) -> Completion:
        self.calls.append(("chat", req))
        if callable(self.reply):
            text = self.reply(req)
        elif self.reply is not None:
            text = self.reply
        else:
            toks = json.loads(req.messages[-1]["content"].split("Tokens: ", 1)[1])
            text = json.dumps({"activations": [{"token": t, "activation": 10 if self.keyword in t else 0}
                                               for t in toks]})
        return Completion(text=text, model=self.model_name, prompt_tokens=self.count_message_tokens(req.messages),
                          completion_tokens=self.count_tokens(text))
