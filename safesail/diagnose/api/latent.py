"""GET /api/latents/{layer}/{index}: one latent's explanations (every language), scores (every scorer kind
with its interval and controls), tags, histogram, examples and causal checks."""

from fastapi import APIRouter, Path, Request

from safesail.diagnose.api.common import ApiError, engine_of
from safesail.diagnose.schemas import ErrorResponse, ExampleOut, HistogramOut, LatentResponse

router = APIRouter()


def _example(seg) -> ExampleOut:
    if isinstance(seg, str):
        return ExampleOut(text=seg)
    tokens = [str(t) for t in seg.get("tokens") or []]
    acts = [float(a) for a in seg.get("activations") or seg.get("acts") or []]
    text = seg.get("text")
    if text is None:
        text = "".join(tokens)
    mx = seg.get("max_activation")
    if mx is None and acts:
        mx = max(acts)
    return ExampleOut(text=str(text), tokens=tokens, activations=acts, max_activation=mx)


def to_latent_response(row: dict, hook: str, layer: int, index: int) -> LatentResponse:
    hist = row.get("histogram")
    hist_source = "all tokens" if hist else None
    if not hist and row.get("top_acts"):
        import numpy as np

        counts, edges = np.histogram(np.asarray(row["top_acts"], dtype=np.float64), bins=20)
        hist = {"counts": counts.tolist(), "edges": edges.tolist()}
        hist_source = "top activations"
    quant = dict(row.get("quantiles") or {}) if isinstance(row.get("quantiles"), dict) else {}
    if row.get("quantile_999") is not None:
        quant["0.999"] = row["quantile_999"]
    if row.get("max_act") is not None:
        quant["max"] = row["max_act"]
    evidence = row.get("tag_evidence")
    if evidence is None and isinstance(row.get("tag_details"), dict):
        evidence = row["tag_details"]
    details = row.get("score_details")
    return LatentResponse(
        neuron_id=f"{layer}_{index}", hook=hook, layer=layer, index=index, explanation=row.get("explanation"),
        score=row.get("score"), tags=list(row.get("tags") or []), density=row.get("density"),
        quantiles={str(k): float(v) for k, v in quant.items() if v is not None},
        histogram=HistogramOut(counts=list(hist["counts"]), edges=list(hist["edges"])) if hist else None,
        histogram_source=hist_source,
        examples=[_example(s) for s in (row.get("examples") or row.get("segments") or [])],
        score_details=details if isinstance(details, dict) or details is None else {"value": details},
        tag_evidence=evidence if isinstance(evidence, dict) or evidence is None else {"value": evidence},
        explanations=dict(row.get("explanations") or {}), scores=dict(row.get("scores") or {}),
        verify_effects=list(row.get("verify_effects") or []))


@router.get("/api/latents/{layer}/{index}", response_model=LatentResponse,
            responses={404: {"model": ErrorResponse, "description": "no such latent in the database"}},
            tags=["diagnose"])
def latent(request: Request, layer: int = Path(ge=0, le=100_000),
           index: int = Path(ge=0, le=2**63 - 1)) -> LatentResponse:  # SQLite integers are 64-bit
    engine = engine_of(request)
    hooks = [b.hook.name for b in engine.saes if b.layer == layer]
    if not hooks:
        raise ApiError(404, "not_found", f"the database has no SAE on layer {layer}; pick one of "
                                         f"{', '.join(str(b.layer) for b in engine.saes)}.")
    row = engine.db.latent(hooks[0], index)
    if row is None:
        raise ApiError(404, "not_found", f"latent {layer}_{index} is not in the neuron database; check the id.")
    return to_latent_response(row, hooks[0], layer, index)
