"""Typed request and response models of the diagnose JSON API (the source of truth).

The web page, the CLI's `--json` output and `docs/openapi.json` all follow these.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from safesail.domains import DOMAINS, Domain  # noqa: F401  (re-exported for the API modules)

Role = Literal["system", "template", "query", "answer"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(_Model):
    error: str = Field(description="a short machine-readable code: busy, timeout, too_large, bad_request, not_found")
    message: str = Field(description="one sentence: what was wrong and what to do")


# ---- requests -------------------------------------------------------------
class Filters(_Model):
    """Server-side filters on the latents returned per token (the page filters again client-side)."""

    domains: list[Domain] = Field(default_factory=list, description="keep latents tagged with any of these; empty keeps all")
    min_score: Optional[float] = Field(default=None, description="keep latents whose explanation score is at least this")
    score_kind: str = Field(default="simulation", description="the scorer min_score applies to: simulation, "
                                                              "detection or fuzzing")
    min_norm: float = Field(default=0.0, ge=0.0, description="keep latents whose normalized activation is above this")


class DiagnoseRequest(_Model):
    query: str = Field(min_length=1, description="the user query, as typed")
    answer: Optional[str] = Field(default=None, description="diagnose this answer instead of generating one")
    max_new_tokens: Optional[int] = Field(default=None, ge=1, description="answer length limit; default from config")
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0, description="0 is greedy; default from config")
    top: Optional[int] = Field(default=None, ge=1, le=1000, description="latents kept per token; default from config")
    include_template: bool = Field(default=False, description="also list latents on system-prompt and template tokens")
    filters: Filters = Field(default_factory=Filters)


class CompareRequest(_Model):
    queries: dict[str, str] = Field(description="language code -> the same query in that language (2 or 3 entries)")
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    scope: Literal["all", "query", "answer"] = Field(default="all", description="which tokens' latents count")
    filters: Filters = Field(default_factory=Filters)


# ---- responses ------------------------------------------------------------
class LatentHit(_Model):
    neuron_id: str = Field(description="'{layer}_{index}', Safe-SAIL's neuron id")
    hook: str
    layer: int
    index: int
    activation: float = Field(description="raw SAE activation")
    norm_activation: float = Field(description="activation / the latent's 0.999 quantile")
    explanation: Optional[str] = None
    score: Optional[float] = Field(default=None, description="the simulation score (Safe-SAIL's correlation_score)")
    scores: dict[str, float] = Field(default_factory=dict, description="scorer kind -> its score")
    tags: list[str] = Field(default_factory=list)


class TokenInfo(_Model):
    position: int
    token_id: int
    text: str = Field(description="the token's text (empty when it only completes a multi-byte character later)")
    role: Role
    special: bool = Field(description="chat-template special token: masked, never annotated")
    max_norm: float = Field(description="strongest normalized activation among its safety-tagged latents (0 if none)")
    max_domain: Optional[str] = Field(default=None, description="domain of that strongest safety latent")
    n_active: int = Field(description="how many database latents fire on this token before `top` and filters")
    latents: list[LatentHit]


class Timings(_Model):
    generate_s: float = 0.0
    forward_s: float = 0.0
    encode_s: float = 0.0
    lookup_s: float = 0.0
    respond_s: float = Field(default=0.0, description="building the per-token tables")
    total_s: float = 0.0
    queue_s: float = 0.0


class DiagnoseResponse(_Model):
    query: str
    answer: str
    generated: bool = Field(description="false when the answer was given in the request")
    truncated: bool = Field(description="generation stopped at the token limit or the time limit")
    tokens: list[TokenInfo]
    timings: Timings


class CompareLatent(_Model):
    neuron_id: str
    layer: int
    index: int
    explanation: Optional[str] = None
    score: Optional[float] = None
    tags: list[str] = Field(default_factory=list)
    max_norm: dict[str, float] = Field(description="language -> strongest normalized activation over its tokens")


class CompareGroup(_Model):
    domain: str = Field(description="a safety domain, or 'general' for untagged latents")
    layer: int
    shared: list[CompareLatent] = Field(description="latents every language uses")
    unique: dict[str, list[CompareLatent]] = Field(description="language -> latents only that language uses")
    partial: list[CompareLatent] = Field(default_factory=list, description="latents some but not all languages use")


class CompareResponse(_Model):
    languages: list[str]
    results: dict[str, DiagnoseResponse]
    groups: list[CompareGroup]
    summary: dict[str, dict[str, int]] = Field(
        description="domain -> {'shared': n, '<lang>': n unique, ...} over all layers")


class SAEInfo(_Model):
    hook: str
    layer: int
    arch: Optional[str] = None
    k: Optional[int] = None
    width: Optional[int] = None
    d_in: Optional[int] = None
    n_db_latents: int = Field(description="latents of this SAE with a normalisation quantile in the database")


class Limits(_Model):
    max_query_chars: int
    max_prompt_tokens: int
    max_new_tokens: int
    max_new_tokens_limit: int
    max_body_bytes: int
    queue_size: int
    request_timeout_s: float


class InfoResponse(_Model):
    model: str
    db_model: Optional[str] = None
    db_path: str
    saes: list[SAEInfo]
    domains: list[str]
    limits: Limits
    temperature: float
    top: int


class HistogramOut(_Model):
    counts: list[float]
    edges: list[float]


class ExampleOut(_Model):
    text: str = Field(description="the segment as one string")
    tokens: list[str] = Field(default_factory=list)
    activations: list[float] = Field(default_factory=list)
    max_activation: Optional[float] = None


class LatentResponse(_Model):
    neuron_id: str
    hook: str
    layer: int
    index: int
    explanation: Optional[str] = None
    score: Optional[float] = None
    tags: list[str] = Field(default_factory=list)
    density: Optional[float] = None
    quantiles: dict[str, float] = Field(default_factory=dict)
    histogram: Optional[HistogramOut] = None
    histogram_source: Optional[str] = Field(default=None, description="'all tokens' or 'top activations' (imported release)")
    examples: list[ExampleOut] = Field(default_factory=list)
    score_details: Optional[dict] = None
    tag_evidence: Optional[dict] = None
    explanations: dict[str, Optional[str]] = Field(default_factory=dict, description="language -> explanation "
                                                   "(e.g. Safe-SAIL's en and cn), side by side")
    scores: dict[str, dict] = Field(default_factory=dict, description="scorer kind -> value, ci_low, ci_high, "
                                    "control_shuffled, control_constant, beats_shuffled, n_examples, costs, status")
    verify_effects: list[dict] = Field(default_factory=list, description="causal checks of this latent "
                                       "(check, metric, target, domain, lang, value, interval, n)")


class ComparePreset(_Model):
    id: str
    domain: Optional[str] = None
    queries: dict[str, str]


class PresetsResponse(_Model):
    presets: list[ComparePreset]
