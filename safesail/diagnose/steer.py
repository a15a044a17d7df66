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
from dataclasses import dataclass
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


def _annotated_sides(engine, req: SteerRequest, gen: "_Generation") -> list[SteerSide]:
    """Per-token latents of the generated answers from the activations their generation left at the
    database's hook points (row r under its edits), and their refusal scores: no forward of its own."""
    from safesail.diagnose.schemas import Timings

    sides = []
    _, roles = engine._prompt(req.query)
    for r, (text, truncated, answer_ids) in enumerate(gen.answers):
        ids = gen.prompt + answer_ids
        timings = Timings()
        a = engine._encoded(req.query, text, ids, roles + ["answer"] * len(answer_ids),
                            {h: v[r, :len(ids)] for h, v in gen.acts.items()}, timings)
        a.generated, a.truncated = True, truncated
        a.timings.generate_s = gen.seconds
        a.timings.total_s = gen.seconds + timings.encode_s + timings.lookup_s
        refusal = RefusalScore(logprob=gen.refusal[r], refused=is_refusal(text), lang=query_lang(req.query))
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


@dataclass
class _Generation:
    prompt: list[int]
    answers: list[tuple[str, bool, list[int]]]    # per row: text, cut at the limit, answer ids (no end token)
    seconds: float
    refusal: list[float]                          # per row: log P(a refusal opening | prompt), under its edits
    acts: dict[str, torch.Tensor]                 # hook -> [rows, positions, d] outputs (edited where edited)


class _Keep:
    """Forward hooks that keep every output of the database's hook points (prefill, then one per step)."""

    def __init__(self, model, points):
        from safesail.hooks import hook_module

        self.out: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in points}
        self.handles = [hook_module(model, hp).register_forward_hook(self._hook(hp.name)) for hp in points]

    def _hook(self, name):
        def fn(_module, _inputs, output):
            self.out[name].append((output[0] if isinstance(output, (tuple, list)) else output).detach())
        return fn

    def remove(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {k: torch.cat(v, 1) for k, v in self.out.items() if v}


@torch.no_grad()
def _generate_rows(engine, req: SteerRequest, iv: Intervention, rows: list[bool], deadline, on_text) -> _Generation:
    """The prompt answered in one batch, row r under `iv` when rows[r]. The generation itself gives
    everything else: each row's activations at the database's hook points (the SAE codes of its
    prompt and answer, read as they were computed, under its edits), and its refusal log-prob (the
    first step's logits and the generation's KV cache of the prompt): no pass of its own for either."""
    from safesail.token_text import drop_incomplete_tail
    from safesail.verify.generation import _cache_of, _continuations
    from safesail.verify.refusal import from_opening_logprobs, opening_ids

    lm, tok, s = engine.lm, engine.lm.tokenizer, engine.settings
    prompt, _ = engine._prompt(req.query)  # the chat template, within the prompt limit (one sentence if over)
    P = len(prompt)
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
    eos = lm.model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id}
    t0 = time.perf_counter()
    with iv.apply(lm.model, rows=rows if len(rows) > 1 else None):
        keep = _Keep(lm.model, engine.points)      # registered after the edits: it sees the edited outputs
        try:
            gen = lm.model.generate(ids, **kw)
            seqs = gen.sequences[:, P:].tolist()
            cuts = [next((k for k, t in enumerate(row) if t in stops), None) for row in seqs]
            cache = _cache_of(gen)
            if any(c is None for c in cuts) and seqs[0]:
                # the last generated token was never fed: one more step gives its activations
                nxt = gen.sequences[:, -1:]
                lm.model(input_ids=nxt, attention_mask=torch.ones((len(rows), gen.sequences.shape[1]), dtype=torch.long,
                                                                  device=lm.device),
                         cache=cache, use_cache=True)
        finally:
            acts = keep.remove()
    gen_s = time.perf_counter() - t0
    answers = []
    for row, cut in zip(seqs, cuts):
        ans = row if cut is None else row[:cut]
        if cut is None:
            ans = drop_incomplete_tail(tok, ans)   # cut inside a character: drop its first bytes (no U+FFFD)
        answers.append((tok.decode(ans, skip_special_tokens=True), cut is None, ans))
    # refusal openings from the generation's cache of the prompt (rows keep their edits)
    first = torch.log_softmax(gen.logits[0].float(), -1).cpu()
    if cache.get_seq_length() > P:
        cache.crop(P - cache.get_seq_length())
    conts = opening_ids(tok, [query_lang(req.query)] * len(rows))
    lps = _continuations(lm, cache, [prompt] * len(rows), torch.ones((len(rows), P), dtype=torch.long), first, conts,
                         [iv if r else None for r in rows])
    return _Generation(prompt, answers, gen_s, from_opening_logprobs(lps), acts)


def steer(engine, req: SteerRequest, deadline: float | None = None, on_text=None) -> SteerResponse:
    """`on_text(side, piece)` receives both answers' text as they are generated ("original", "steered").

    Without a cached original side, both answers are generated in one batch of two (the edits
    apply to the second row only); their per-token latents are the SAE codes of the activations
    that generation computed (edited where edited) and their refusal scores come from its first
    logits and its KV cache of the prompt, so a cold steer costs one two-row generation and no
    other pass over the model.
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
    gen = _generate_rows(engine, req, iv, rows, deadline, on_text)
    sides = _annotated_sides(engine, req, gen)
    steered = sides[-1]
    if len(rows) == 2:
        original = sides[0]
        if temp == 0:
            cache.put(key, original)
    return SteerResponse(query=req.query, edits=req.edits, original=original, steered=steered,
                         steer_s=time.perf_counter() - t0)
