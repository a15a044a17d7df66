"""Steering in the diagnose engine: the same query answered with and without interventions.

`steer(engine, req)` answers the query as is (the "original" side, cached per query for
greedy decoding so that trying several strengths costs one generation each) and under the
request's edits (`safesail.verify.interventions`: add / clamp / ablate latents of the
database's SAEs). Both sides are annotated like `/api/diagnose` (the steered side's
per-token latents are read under the intervention) and carry a refusal score. Used by
`POST /api/steer`, `/api/steer/stream` and `safesail diagnose --ablate/--clamp/--add`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from safesail.diagnose.schemas import DiagnoseResponse, Filters
from safesail.verify.interventions import Intervention, LatentEdit, SteerableSAE, parse_neuron_id
from safesail.verify.refusal import is_refusal, query_lang

MAX_EDITS = 16
CACHE_SIZE = 8


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SteerEdit(_Model):
    neuron_id: str = Field(description="'{layer}_{index}', e.g. 14_3598")
    mode: Literal["add", "clamp", "ablate"] = Field(description="add alpha*s*d, clamp the code to strength*s, "
                                                                "or ablate it (s: the latent's 0.999 quantile)")
    strength: float = Field(default=0.0, description="normalized activation (ignored by ablate); |strength| <= 100")


class SteerRequest(_Model):
    query: str = Field(min_length=1, description="the user query, as typed")
    edits: list[SteerEdit] = Field(min_length=1, description=f"1..{MAX_EDITS} interventions applied together")
    max_new_tokens: Optional[int] = Field(default=None, ge=1, description="answer length limit; default from config")
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0, description="0 is greedy; default from config")
    top: Optional[int] = Field(default=None, ge=1, le=1000, description="latents kept per token; default from config")
    include_original: bool = Field(default=True, description="also answer without the edits (cached per query)")
    filters: Filters = Field(default_factory=Filters)


class RefusalScore(_Model):
    logprob: float = Field(description="log-probability that the answer opens with a refusal ('I can't', '抱歉', ...)")
    refused: bool = Field(description="a refusal phrase in the answer's first 160 characters")
    lang: str = Field(description="language of the refusal openings used (with English)")


class SteerSide(_Model):
    result: DiagnoseResponse
    refusal: RefusalScore
    cached: bool = Field(default=False, description="the original side came from the per-query cache")


class SteerResponse(_Model):
    query: str
    edits: list[SteerEdit]
    original: Optional[SteerSide] = None
    steered: SteerSide
    steer_s: float = Field(description="seconds spent on the request (without queueing)")


def to_edits(edits: list[SteerEdit]) -> list[LatentEdit]:
    from safesail.errors import UserError

    if len(edits) > MAX_EDITS:
        raise UserError(f"{len(edits)} edits at once is over the limit of {MAX_EDITS}; apply fewer.")
    out = []
    for e in edits:
        layer, latent = parse_neuron_id(e.neuron_id)
        out.append(LatentEdit(layer, latent, e.mode, 0.0 if e.mode == "ablate" else float(e.strength)))
    return out


def intervention_for(engine, edits: list[LatentEdit]) -> Intervention:
    return Intervention([SteerableSAE.from_bound(b) for b in engine.saes], edits)


class _Originals:
    """Per-engine LRU cache of greedy original sides, keyed by the query and its settings."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items: OrderedDict = OrderedDict()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value):
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > CACHE_SIZE:
                self.items.popitem(last=False)


def _originals(engine) -> _Originals:
    cache = getattr(engine, "_steer_originals", None)
    if cache is None:
        cache = engine._steer_originals = _Originals()
    return cache


def _annotated_sides(engine, req: SteerRequest, answers: list[tuple[str, bool]], generate_s: float,
                     iv: Intervention, rows: list[bool], refusal_lps: list[float]) -> list[SteerSide]:
    """Per-token latents of the generated answers, all read in ONE batched forward pass (row r under
    `iv` when rows[r]), and their refusal scores."""
    edit = (lambda model, n: iv.apply(model, rows=rows if n > 1 else None))  # noqa: E731
    annotated = engine.annotate_answers(req.query, [text for text, _ in answers], edits=edit)
    sides = []
    for a, (text, truncated), lp in zip(annotated, answers, refusal_lps):
        a.generated, a.truncated = True, truncated
        a.timings.generate_s = generate_s
        a.timings.total_s += generate_s
        refusal = RefusalScore(logprob=lp, refused=is_refusal(text), lang=query_lang(req.query))
        sides.append(SteerSide(result=engine.response(a, req.top, req.filters), refusal=refusal))
    return sides


class _RowStreamer:
    """Hands each batch row's generated text to its own callback (rows: original, steered)."""

    def __init__(self, tokenizer, callbacks):
        from safesail.diagnose.streaming import CallbackStreamer

        self.rows = [CallbackStreamer(tokenizer, cb) for cb in callbacks]

    def put(self, value) -> None:
        value = value.reshape(len(self.rows), -1)
        for s, v in zip(self.rows, value):
            s.put(v)

    def end(self) -> None:
        for s in self.rows:
            s.end()


@torch.no_grad()
def _generate_rows(engine, req: SteerRequest, iv: Intervention, rows: list[bool], deadline, on_text):
    """Answers of the prompt in one batch, row r under `iv` when rows[r]: [(text, truncated)], seconds, and
    each row's refusal log-prob, read from the generation itself (the first step's logits and the
    generation's KV cache of the prompt, under the row's edits): no pass over the prompt of its own."""
    from safesail.verify.generation import _cache_of, _continuations
    from safesail.verify.refusal import from_opening_logprobs, opening_ids

    lm, tok, s = engine.lm, engine.lm.tokenizer, engine.settings
    prompt, _ = engine._prompt(req.query)  # the chat template, within the prompt limit (one sentence if over)
    n = engine._new_tokens(req.max_new_tokens)
    temp = s.temperature if req.temperature is None else float(req.temperature)
    ids = torch.tensor([prompt] * len(rows), device=lm.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kw = dict(max_new_tokens=n, pad_token_id=pad, attention_mask=torch.ones_like(ids), return_dict_in_generate=True,
              output_logits=True)
    if temp > 0:
        kw.update(do_sample=True, temperature=temp, top_p=1.0, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if deadline is not None:
        kw["max_time"] = max(deadline - time.perf_counter(), 0.01)
    if on_text is not None:
        names = ["steered" if r else "original" for r in rows]
        kw["streamer"] = _RowStreamer(tok, [(lambda p, nm=nm: on_text(nm, p)) for nm in names])
    t0 = time.perf_counter()
    with iv.apply(lm.model, rows=rows if len(rows) > 1 else None):
        gen = lm.model.generate(ids, **kw)
    gen_s = time.perf_counter() - t0
    out = gen.sequences[:, len(prompt):].tolist()
    eos = lm.model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id}
    answers = []
    for row in out:
        cut = next((k for k, t in enumerate(row) if t in stops), None)
        answers.append((tok.decode(row if cut is None else row[:cut], skip_special_tokens=True), cut is None))
    # refusal openings from the generation's cache of the prompt (rows keep their edits)
    first = torch.log_softmax(gen.logits[0].float(), -1).cpu()
    cache = _cache_of(gen)
    if cache.get_seq_length() > len(prompt):
        cache.crop(len(prompt) - cache.get_seq_length())
    conts = opening_ids(tok, [query_lang(req.query)] * len(rows))
    lps = _continuations(lm, cache, [prompt] * len(rows), torch.ones((len(rows), len(prompt)), dtype=torch.long),
                         first, conts, [iv if r else None for r in rows])
    return answers, gen_s, from_opening_logprobs(lps)


def steer(engine, req: SteerRequest, deadline: float | None = None, on_text=None) -> SteerResponse:
    """`on_text(side, piece)` receives both answers' text as they are generated ("original", "steered").

    Without a cached original side, both answers are generated in one batch of two (the edits
    apply to the second row only), their refusal scores read from that generation (its first
    logits and its KV cache of the prompt) and their per-token latents in one batched pass, so a
    cold steer costs about one diagnose, not two.
    """
    t0 = time.perf_counter()
    engine.check_query(req.query)
    iv = intervention_for(engine, to_edits(req.edits))
    temp = engine.settings.temperature if req.temperature is None else float(req.temperature)
    key = (req.query, req.max_new_tokens, req.top, req.filters.model_dump_json())
    cache = _originals(engine)
    original = cache.get(key) if req.include_original and temp == 0 else None
    if original is not None:
        original = original.model_copy(update={"cached": True})
        if on_text:
            on_text("original", original.result.answer)
    rows = [False, True] if req.include_original and original is None else [True]
    answers, gen_s, lps = _generate_rows(engine, req, iv, rows, deadline, on_text)
    sides = _annotated_sides(engine, req, answers, gen_s, iv, rows, lps)
    steered = sides[-1]
    if len(rows) == 2:
        original = sides[0]
        if temp == 0:
            cache.put(key, original)
    return SteerResponse(query=req.query, edits=req.edits, original=original, steered=steered,
                         steer_s=time.perf_counter() - t0)
