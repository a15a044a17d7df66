"""POST /api/steer and /api/steer/stream: the query answered with and without latent interventions.

The stream sends `token` events {side: "original" | "steered", text} while the answers are
generated, then one `result` (SteerResponse) or `error` (ErrorResponse). Bad latent ids,
strengths out of range and layers without an SAE are 400 answers with one sentence.
"""

from fastapi import APIRouter, Request

from safesail.diagnose.api.common import ERRORS, with_model
from safesail.diagnose.api.stream import sse_stream
from safesail.diagnose.steer import SteerRequest, SteerResponse, intervention_for, steer, to_edits

router = APIRouter()


@router.post("/api/steer", response_model=SteerResponse, responses=ERRORS, tags=["steer"])
def steer_endpoint(req: SteerRequest, request: Request) -> SteerResponse:
    resp, _ = with_model(request, lambda engine, deadline: steer(engine, req, deadline))
    return resp


@router.post("/api/steer/stream", responses={**ERRORS, 200: {
    "content": {"text/event-stream": {}},
    "description": "events `token` {side, text}, then `result` (SteerResponse) or `error` (ErrorResponse)"}},
    tags=["steer"])
def steer_stream(req: SteerRequest, request: Request):
    def check(engine):
        engine.check_query(req.query)
        intervention_for(engine, to_edits(req.edits))

    def run(engine, deadline, emit):
        return steer(engine, req, deadline, on_text=lambda side, piece: emit("token", {"side": side, "text": piece}))

    return sse_stream(request, check, run)
