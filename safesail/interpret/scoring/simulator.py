"""The simulator: an LLM reads an explanation and predicts a latent's activation on each token.

One interface (`Simulator.simulate(explanation, tokens) -> SimResult`), two modes:

* ``logprobs`` (all at once): one forward pass over `prompts.simulate.logprob_prompt`;
  at each token's slot (the TAB after it) read the log-probabilities of the answers
  ``0 .. scale_max`` and take the expected value under their renormalised
  distribution. Needs `client.supports_prompt_logprobs` (exact with the local
  transformers back end; top-N only through an API that echoes prompt logprobs).
  The scale is 0..10 when the back end's tokenizer writes "10" as one token and
  0..9 otherwise (SmolLM2 and Qwen split numbers into digits), so every answer is a
  single token and its probability is read exactly. Pearson correlation does not
  depend on the scale.
* ``json``: a chat request asking for ``{"activations": [{"token", "activation"}]}``
  (with a JSON schema for back ends that honour one), parsed leniently around the
  JSON (code fences, prose) and strictly inside it: count, token text, value range,
  no extra keys. Scale 0..10.

A simulation never raises for a model's mistake: it returns a `SimResult` whose
`failure` is ``"<code>: <detail>"`` (codes in `FAILURE_CODES`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from safesail.errors import UserError
from safesail.interpret.clients.base import ChatRequest, LLMClient, LLMError
from safesail.interpret.scoring.prompts import simulation as prompts

MODES = ("auto", "logprobs", "json")
FAILURE_CODES = {
    "llm_error": "the LLM call failed (the back end's reason follows)",
    "context_overflow": "the prompt does not fit the simulator's context window",
    "prompt_alignment": "the prompt's token slots could not be located in the back end's tokens",
    "logprobs_missing": "the back end returned no probability for any answer at a token",
    "unparsable_reply": "the reply holds no JSON object of the asked form",
    "extra_keys": "the reply's JSON has keys that were not asked for",
    "count_mismatch": "the reply has a different number of entries than the segment has tokens",
    "token_mismatch": "an entry's token text is not the segment's token",
    "bad_value": "an activation is not a finite number",
    "value_out_of_range": "an activation is outside the scale",
}
MAX_REPLY_CHARS = 200_000
_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n?(.*?)\n?\s*```\s*$", re.S)


class SimulationFailure(Exception):
    def __init__(self, code: str, detail: str = ""):
        assert code in FAILURE_CODES, code
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


@dataclass
class SimResult:
    pred: list[float] | None
    failure: str | None = None
    llm_calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    raw: str | None = None            # the reply text (json mode), kept short, for failed parses

    @property
    def ok(self) -> bool:
        return self.failure is None


# ---- logprobs mode ------------------------------------------------------------------------

def expected_values(slot_logprobs: list[dict[str, float]], scale_max: int) -> list[float]:
    """Expected answer at each slot from the log-probabilities of the answers "0".."scale_max".

    Probabilities are renormalised over the answers present (an API may return only its
    top-N); a slot with none of them raises `SimulationFailure("logprobs_missing")`.
    """
    out = []
    for i, lps in enumerate(slot_logprobs):
        vals = []
        for v in range(scale_max + 1):
            lp = lps.get(str(v))
            if lp is not None and math.isfinite(lp):
                vals.append((v, float(lp)))
        if not vals:
            raise SimulationFailure("logprobs_missing", f"no answer 0..{scale_max} among the log-probabilities "
                                                        f"at token {i}")
        top = max(lp for _, lp in vals)
        weights = [(v, math.exp(lp - top)) for v, lp in vals]
        total = sum(w for _, w in weights)
        out.append(sum(v * w for v, w in weights) / total)
    return out


def yes_values(slot_logprobs: list[dict[str, float]], scale_max: int) -> list[float]:
    """`scale_max` x P(Yes) at each slot, renormalised over the two answers (yes/no prompt styles);
    a slot missing either answer raises `SimulationFailure("logprobs_missing")`."""
    out = []
    for i, lps in enumerate(slot_logprobs):
        y, n = lps.get(prompts.YES), lps.get(prompts.NO)
        if y is None or n is None or not (math.isfinite(y) or math.isfinite(n)):
            raise SimulationFailure("logprobs_missing", f"no {prompts.YES}/{prompts.NO} log-probabilities at token {i}")
        y = y if math.isfinite(y) else -math.inf
        n = n if math.isfinite(n) else -math.inf
        out.append(scale_max / (1.0 + math.exp(n - y)) if y >= n else scale_max * math.exp(y - n) / (1.0 + math.exp(y - n)))
    return out


def find_slots(tokens: list[str], n_before: int, n_slots: int) -> list[int]:
    """Indices of the prompt tokens after which the model writes each segment token's answer.

    The prompt holds exactly `n_before + n_slots` TABs, each of which must end its own
    token (`render_token` escapes TABs inside segment tokens); anything else is a
    `prompt_alignment` failure. Tokens may come decoded ("\t") or as raw byte-level
    BPE strings, where TAB is spelled "\u0109" (a literal U+0109 would be two other bytes).
    """
    mark = prompts.SEPARATOR if any(prompts.SEPARATOR in t for t in tokens) else "\u0109"
    holding = [i for i, t in enumerate(tokens) if mark in t]
    seps = [i for i in holding if tokens[i].endswith(mark)]
    if len(seps) != len(holding) or len(seps) != n_before + n_slots:
        raise SimulationFailure("prompt_alignment", f"expected {n_before + n_slots} tokens ending in a TAB, found "
                                                    f"{len(seps)} ({len(holding)} hold one)")
    return seps[n_before:]


def single_token_scale(client: LLMClient, max_value: int = 10) -> int:
    """The largest scale top <= max_value whose answers "0".."top" are each one token."""
    one = client.count_tokens("1")
    top = max_value
    while top > 1 and client.count_tokens(str(top)) != one:
        top -= 1
    return top


# ---- json mode --------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"non-finite constant {name}")


def extract_json_object(text: str):
    """The first JSON value in a reply: the whole text, a fenced block, or the first {...} in prose.

    NaN/Infinity are rejected; raises `SimulationFailure("unparsable_reply")` when there is none."""
    body = text.strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1).strip()
    dec = json.JSONDecoder(parse_constant=_reject_constant)
    try:
        return dec.decode(body)
    except (ValueError, RecursionError):
        pass
    start = body.find("{")
    tries = 0
    while start != -1 and tries < 20:  # a bounded search: a reply of many "{" must not cost quadratic time
        tries += 1
        try:
            obj, _ = dec.raw_decode(body, start)
            return obj
        except (ValueError, RecursionError):
            start = body.find("{", start + 1)
    raise SimulationFailure("unparsable_reply", "no JSON object in the reply")


def only_key(obj, key: str):
    """`obj[key]` of a reply's JSON `obj` that must be an object of that one key (else a SimulationFailure)."""
    if not isinstance(obj, dict) or key not in obj:
        raise SimulationFailure("unparsable_reply", f'the JSON is not an object with key "{key}"')
    extra = sorted(set(obj) - {key})
    if extra:
        raise SimulationFailure("extra_keys", f"unexpected keys {extra[:5]!r}")
    return obj[key]


def _same_token(got: str, want: str) -> bool:
    return got == want or got.strip() == want.strip() or got == prompts.render_token(want)


def parse_json_prediction(text: str, tokens: list[str], scale_max: int) -> list[float]:
    """Validate a JSON-mode reply against the segment's tokens; return the predicted values."""
    if not isinstance(text, str) or not text.strip():
        raise SimulationFailure("unparsable_reply", "empty reply")
    if len(text) > MAX_REPLY_CHARS:
        raise SimulationFailure("unparsable_reply", f"reply of {len(text)} characters is too long")
    return _entries(only_key(extract_json_object(text), "activations"), tokens, scale_max)


def parse_json_many(text: str, segments: list[list[str]], scale_max: int) -> list[list[float] | SimulationFailure]:
    """Validate a several-segment JSON reply `{"segments": [{"activations": [...]}, ...]}`: per segment,
    its values or the failure of that segment (a reply that is not of that form fails every segment)."""
    if not isinstance(text, str) or not text.strip():
        raise SimulationFailure("unparsable_reply", "empty reply")
    if len(text) > MAX_REPLY_CHARS:
        raise SimulationFailure("unparsable_reply", f"reply of {len(text)} characters is too long")
    obj = extract_json_object(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("segments"), list):
        raise SimulationFailure("unparsable_reply", 'the JSON is not an object with a list under "segments"')
    if sorted(set(obj) - {"segments"}):
        raise SimulationFailure("extra_keys", f"unexpected keys {sorted(set(obj) - {'segments'})[:5]!r}")
    if len(obj["segments"]) != len(segments):
        raise SimulationFailure("count_mismatch", f"{len(obj['segments'])} segments in the reply for {len(segments)}")
    out: list[list[float] | SimulationFailure] = []
    for part, tokens in zip(obj["segments"], segments):
        try:
            if not isinstance(part, dict) or set(part) != {"activations"}:
                raise SimulationFailure("unparsable_reply", 'a segment is not an object with key "activations"')
            out.append(_entries(part["activations"], tokens, scale_max))
        except SimulationFailure as f:
            out.append(f)
    return out


def _entries(entries, tokens: list[str], scale_max: int) -> list[float]:
    if not isinstance(entries, list):
        raise SimulationFailure("unparsable_reply", '"activations" is not a list')
    if len(entries) != len(tokens):
        raise SimulationFailure("count_mismatch", f"{len(entries)} entries for {len(tokens)} tokens")
    out = []
    for i, (entry, want) in enumerate(zip(entries, tokens)):
        if not isinstance(entry, dict):
            raise SimulationFailure("unparsable_reply", f"entry {i} is not an object")
        extra = sorted(set(entry) - {"token", "activation"})
        if extra:
            raise SimulationFailure("extra_keys", f"entry {i} has unexpected keys {extra[:5]!r}")
        if "token" not in entry or "activation" not in entry:
            raise SimulationFailure("unparsable_reply", f"entry {i} lacks token or activation")
        got = entry["token"]
        if not isinstance(got, str) or not _same_token(got, want):
            raise SimulationFailure("token_mismatch", f"entry {i} is {str(got)[:40]!r}, the token is {want!r}")
        v = entry["activation"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise SimulationFailure("bad_value", f"entry {i} has activation {str(v)[:40]!r}")
        if not 0 <= v <= scale_max:
            raise SimulationFailure("value_out_of_range", f"entry {i} has activation {v} outside 0..{scale_max}")
        out.append(float(v))
    return out


# ---- the simulator -------------------------------------------------------------------------

def choose_mode(client: LLMClient, requested: str = "auto") -> str:
    if requested not in MODES:
        raise UserError(f"unknown score.mode {requested!r}; use one of {', '.join(MODES)}.")
    if requested == "auto":
        return "logprobs" if client.supports_prompt_logprobs else "json"
    if requested == "logprobs" and not client.supports_prompt_logprobs:
        raise UserError(f"score.mode=logprobs needs prompt log-probabilities, which the {client.model_name!r} "
                        "back end does not return; use score.mode=auto or json.")
    return requested


class Simulator:
    """Predicts per-token activations (on 0..scale_max) from an explanation."""

    def __init__(self, client: LLMClient, mode: str = "auto", max_value: int = 10,
                 json_tokens_per_token: int = 24, style: str = prompts.DEFAULT_STYLE):
        if style not in prompts.STYLES:
            raise UserError(f"unknown score.prompt_style {style!r}; use one of {', '.join(prompts.STYLES)}.")
        self.client = client
        self.mode = choose_mode(client, mode)
        self.scale_max = single_token_scale(client, max_value) if self.mode == "logprobs" else max_value
        self.json_tokens_per_token = json_tokens_per_token
        self.style = style

    @property
    def prompt_version(self) -> str:
        """e.g. sim-v1-logprobs-0..9; the style applies to the logprobs form only (json keeps sim-v1)."""
        style = self.style if self.mode == "logprobs" else prompts.DEFAULT_STYLE
        return f"sim-{style}-{self.mode}-0..{self.scale_max}"

    def _values(self, slot_logprobs: list[dict[str, float]]) -> list[float]:
        if self.style in prompts.YES_NO:
            return yes_values(slot_logprobs, self.scale_max)
        return expected_values(slot_logprobs, self.scale_max)

    async def simulate(self, explanation: str, tokens: list[str]) -> SimResult:
        if not tokens:
            return SimResult(None, "count_mismatch: the segment has no tokens")
        try:
            if self.mode == "logprobs":
                return await self._simulate_logprobs(explanation, tokens)
            return await self._simulate_json(explanation, tokens)
        except LLMError as e:
            return SimResult(None, f"llm_error: {e.reason} {e.message}".strip(), llm_calls=1)

    async def simulate_many(self, explanation: str, segments: list[list[str]]) -> list[SimResult]:
        """Several segments in one call (one forward pass, or one chat request and reply).

        The call's cost is carried by the first result. A batch that does not fit the
        context window is sent as two halves (down to one segment per call)."""
        if len(segments) <= 1 or any(not t for t in segments):
            return [await self.simulate(explanation, t) for t in segments]
        if self.mode == "json":
            return await self._json_many(explanation, segments)
        prompt, n_before = prompts.logprob_prompt_many(explanation, segments, self.scale_max, self.style)
        if self.client.count_tokens(prompt) >= self.client.context_window:  # too long: two halves
            half = len(segments) // 2
            return (await self.simulate_many(explanation, segments[:half])
                    + await self.simulate_many(explanation, segments[half:]))
        candidates = prompts.answer_words(self.style, self.scale_max)
        try:
            res = await self.client.prompt_logprobs(prompt, candidates, slots_ending_with=prompts.SEPARATOR)
        except LLMError as e:
            fail = f"llm_error: {e.reason} {e.message}".strip()
            return [SimResult(None, fail, llm_calls=int(i == 0)) for i in range(len(segments))]
        out = [SimResult(None) for _ in segments]
        out[0].llm_calls, out[0].cached_calls, out[0].prompt_tokens = 1, int(bool(res.cached)), res.prompt_tokens
        try:
            slots = find_slots(res.tokens, n_before, sum(len(t) for t in segments))
        except SimulationFailure as f:
            for r in out:
                r.failure = str(f)
            return out
        pos = 0
        for r, tokens in zip(out, segments):
            mine = slots[pos:pos + len(tokens)]
            pos += len(tokens)
            try:
                r.pred = self._values([res.next_logprobs[i] for i in mine])
            except SimulationFailure as f:
                r.failure = str(f)
        return out

    async def _simulate_logprobs(self, explanation: str, tokens: list[str]) -> SimResult:
        prompt, n_before = prompts.logprob_prompt(explanation, tokens, self.scale_max, self.style)
        n_prompt = self.client.count_tokens(prompt)
        if n_prompt >= self.client.context_window:
            return SimResult(None, f"context_overflow: {n_prompt} prompt tokens, window "
                                   f"{self.client.context_window}")
        candidates = prompts.answer_words(self.style, self.scale_max)
        res = await self.client.prompt_logprobs(prompt, candidates, slots_ending_with=prompts.SEPARATOR)
        sim = SimResult(None, llm_calls=1, cached_calls=int(bool(res.cached)), prompt_tokens=res.prompt_tokens)
        try:
            slots = find_slots(res.tokens, n_before, len(tokens))
            sim.pred = self._values([res.next_logprobs[i] for i in slots])
        except SimulationFailure as f:
            sim.failure = str(f)
        return sim

    async def _json_many(self, explanation: str, segments: list[list[str]]) -> list[SimResult]:
        messages = prompts.json_messages_many(explanation, segments, self.scale_max)
        max_tokens = self.json_tokens_per_token * sum(len(t) for t in segments) + 32
        if self.client.count_message_tokens(messages) + max_tokens > self.client.context_window:
            half = len(segments) // 2
            return (await self.simulate_many(explanation, segments[:half])
                    + await self.simulate_many(explanation, segments[half:]))
        req = ChatRequest(messages=messages, max_tokens=max_tokens, temperature=0.0,
                          json_schema=prompts.json_schema_many([len(t) for t in segments], self.scale_max))
        try:
            comp = await self.client.chat(req)
        except LLMError as e:
            fail = f"llm_error: {e.reason} {e.message}".strip()
            return [SimResult(None, fail, llm_calls=int(i == 0)) for i in range(len(segments))]
        out = [SimResult(None) for _ in segments]
        out[0].llm_calls, out[0].cached_calls = 1, int(bool(comp.cached))
        out[0].prompt_tokens, out[0].completion_tokens = comp.prompt_tokens, comp.completion_tokens
        try:
            parts = parse_json_many(comp.text, segments, self.scale_max)
        except SimulationFailure as f:
            parts = [f] * len(segments)
        for r, part in zip(out, parts):
            if isinstance(part, SimulationFailure):
                r.failure, r.raw = str(part), (comp.text or "")[:2000]
            else:
                r.pred = part
        return out

    async def _simulate_json(self, explanation: str, tokens: list[str]) -> SimResult:
        messages = prompts.json_messages(explanation, tokens, self.scale_max)
        max_tokens = self.json_tokens_per_token * len(tokens) + 32
        n_prompt = self.client.count_message_tokens(messages)
        if n_prompt + max_tokens > self.client.context_window:
            return SimResult(None, f"context_overflow: {n_prompt} prompt + {max_tokens} reply tokens, window "
                                   f"{self.client.context_window}")
        req = ChatRequest(messages=messages, max_tokens=max_tokens, temperature=0.0,
                          json_schema=prompts.json_schema(len(tokens), self.scale_max))
        comp = await self.client.chat(req)
        sim = SimResult(None, llm_calls=1, cached_calls=int(bool(comp.cached)), prompt_tokens=comp.prompt_tokens,
                        completion_tokens=comp.completion_tokens)
        try:
            sim.pred = parse_json_prediction(comp.text, tokens, self.scale_max)
        except SimulationFailure as f:
            sim.failure = str(f)
            sim.raw = (comp.text or "")[:2000]
        return sim
