"""POST /api/compare: the same query in 2-3 languages; shared and language-only latents."""

from fastapi import APIRouter, Request

from safesail.diagnose.api.common import ERRORS, ApiError, with_model
from safesail.diagnose.compare import compare_annotated
from safesail.diagnose.schemas import CompareRequest, CompareResponse

router = APIRouter()


@router.post("/api/compare", response_model=CompareResponse, responses=ERRORS, tags=["diagnose"])
def compare(req: CompareRequest, request: Request) -> CompareResponse:
    langs = [lang.strip() for lang in req.queries]
    if not 2 <= len(langs) <= 3:
        raise ApiError(400, "bad_request", f"got {len(langs)} languages; give the same query in 2 or 3 languages.")
    if any(not lang or len(lang) > 16 for lang in langs):
        raise ApiError(400, "bad_request", "a language name is empty or longer than 16 characters; use codes like en, zh, hi.")

    def work(engine, deadline):
        per_lang = {lang: engine.annotate(q, None, req.max_new_tokens, req.temperature, deadline=deadline)
                    for lang, q in zip(langs, req.queries.values())}
        groups, summary = compare_annotated(per_lang, req.scope, req.filters)
        results = {lang: engine.response(a, None, req.filters) for lang, a in per_lang.items()}
        return CompareResponse(languages=langs, results=results, groups=groups, summary=summary)

    resp, _ = with_model(request, work)
    return resp
