"""POST /api/diagnose: one query (and its generated or given answer), every token's latents."""

from fastapi import APIRouter, Request

from safesail.diagnose.api.common import ERRORS, with_model
from safesail.diagnose.schemas import DiagnoseRequest, DiagnoseResponse

router = APIRouter()


@router.post("/api/diagnose", response_model=DiagnoseResponse, responses=ERRORS, tags=["diagnose"])
def diagnose(req: DiagnoseRequest, request: Request) -> DiagnoseResponse:
    def work(engine, deadline):
        return engine.diagnose(req.query, req.answer, req.max_new_tokens, req.temperature, req.top, req.filters,
                               req.include_template, deadline=deadline)

    resp, waited = with_model(request, work)
    resp.timings.queue_s = waited
    return resp
