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

    async def prompt_logprobs(self, prompt: str, candidates: list[str],
                              slots_ending_with: str | None = None) -> PromptLogprobs:
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
        elif "\nSegments:\n" in req.messages[-1]["content"]:  # several segments at once
            lines = req.messages[-1]["content"].split("\nSegments:\n", 1)[1].splitlines()
            segs = [json.loads(line.split("Tokens: ", 1)[1]) for line in lines]
            text = json.dumps({"segments": [{"activations": [{"token": t, "activation": 10 if self.keyword in t else 0}
                                                             for t in toks]} for toks in segs]})
        else:
            toks = json.loads(req.messages[-1]["content"].split("Tokens: ", 1)[1])
            text = json.dumps({"activations": [{"token": t, "activation": 10 if self.keyword in t else 0}
                                               for t in toks]})
        return Completion(text=text, model=self.model_name, prompt_tokens=self.count_message_tokens(req.messages),
                          completion_tokens=self.count_tokens(text))


class FakeJudge(FakeClient):
    """A yes/no scorer's test double that follows the explanation: at each answer slot it says yes
    (probability 0.9) when the explanation names the keyword and the excerpt holds it (with
    `marked=True`, only inside << >> marks), else no. `fail_on`: prompts holding this text raise
    a retryable LLMError while `failing` is True."""

    def __init__(self, keyword: str = "pizza", logprobs: bool = True, marked: bool = False, fail_on: str | None = None):
        super().__init__(keyword, logprobs)
        self.marked = marked
        self.fail_on = fail_on
        self.failing = True

    def _says_yes(self, explanation: str, excerpt: str) -> bool:
        if self.keyword not in explanation:
            return False
        if self.marked:
            return any(self.keyword in part.split(">>")[0] for part in excerpt.split("<<")[1:])
        return self.keyword in excerpt

    def _check_fail(self, text: str) -> None:
        from safesail.interpret.clients.base import LLMError

        if self.fail_on and self.failing and self.fail_on in text:
            raise LLMError("server_error", "503 from the fake")

    async def prompt_logprobs(self, prompt: str, candidates: list[str],
                              slots_ending_with: str | None = None) -> PromptLogprobs:
        self._check_fail(prompt)
        if len(candidates) != 2 or candidates == ["0", "1"]:  # a simulation prompt (answers 0..scale_max)
            return await super().prompt_logprobs(prompt, candidates)
        self.calls.append(("prompt_logprobs", prompt))
        toks = _PIECES.findall(prompt)
        yes, no = candidates
        nxt, line, prev_line, expl = [], "", "", ""
        for t in toks:
            if t == "\n":
                if line.startswith("Explanation: "):
                    expl = line
                prev_line, line = line, ""
            elif t != "\t":
                line += t
            hot = t == "\t" and self._says_yes(expl, prev_line)
            nxt.append({yes: math.log(0.9 if hot else 0.1), no: math.log(0.1 if hot else 0.9)})
        return PromptLogprobs(tokens=toks, next_logprobs=nxt, prompt_tokens=len(toks))

    async def chat(self, req: ChatRequest) -> Completion:
        last = req.messages[-1]["content"]
        self._check_fail(last)
        if "\nExcerpts:\n" not in last:  # a simulation request
            return await super().chat(req)
        self.calls.append(("chat", req))
        expl, _, rest = last.partition("\nExcerpts:\n")
        answers = [self._says_yes(expl, line.split(". ", 1)[1]) for line in rest.splitlines()]
        text = json.dumps({"answers": answers})
        return Completion(text=text, model=self.model_name, prompt_tokens=self.count_message_tokens(req.messages),
                          completion_tokens=self.count_tokens(text))
