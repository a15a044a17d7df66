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
from safesail.diagnose.tokens import encode_prompt
from safesail.verify.interventions import Intervention, LatentEdit, SteerableSAE, parse_neuron_id
from safesail.verify.refusal import is_refusal, query_lang, refusal_logprob

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


def _side(engine, req: SteerRequest, iv: Intervention | None, deadline, on_text) -> SteerSide:
    lm = engine.lm
    lang = query_lang(req.query)
    ctx = iv.apply(lm.model) if iv else _Null()
    with ctx, torch.no_grad():
        a = engine.annotate(req.query, None, req.max_new_tokens, req.temperature, deadline, on_text)
        prompt, _ = encode_prompt(lm.tokenizer, req.query, engine.settings.system_prompt)
        lp = refusal_logprob(lm, [prompt], [lang])[0]
    resp = engine.response(a, req.top, req.filters)
    return SteerSide(result=resp, refusal=RefusalScore(logprob=lp, refused=is_refusal(a.answer), lang=lang))


def steer(engine, req: SteerRequest, deadline: float | None = None, on_text=None) -> SteerResponse:
    """`on_text(side, piece)` receives both answers' text as they are generated ("original", "steered")."""
    t0 = time.perf_counter()
    engine.check_query(req.query)
    iv = intervention_for(engine, to_edits(req.edits))
    original = None
    if req.include_original:
        temp = engine.settings.temperature if req.temperature is None else float(req.temperature)
        key = (req.query, req.max_new_tokens, req.top, req.filters.model_dump_json())
        cache = _originals(engine)
        original = cache.get(key) if temp == 0 else None
        if original is not None:
            original = original.model_copy(update={"cached": True})
            if on_text:
                on_text("original", original.result.answer)
        else:
            original = _side(engine, req, None, deadline, (lambda p: on_text("original", p)) if on_text else None)
            if temp == 0:
                cache.put(key, original)
    steered = _side(engine, req, iv, deadline, (lambda p: on_text("steered", p)) if on_text else None)
    return SteerResponse(query=req.query, edits=req.edits, original=original, steered=steered,
                         steer_s=time.perf_counter() - t0)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
