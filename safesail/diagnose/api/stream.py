"""POST /api/diagnose/stream: like /api/diagnose, as server-sent events.

`event: token` (data `{"text": piece}`) while the answer is generated, then one
`event: result` (data: the DiagnoseResponse) or `event: error` (data: an ErrorResponse).
Busy and bad-input answers come before the stream starts, as plain JSON errors.
"""

from __future__ import annotations

import json
import queue
import threading
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from safesail.diagnose.api.common import ERRORS, ApiError, engine_of
from safesail.diagnose.gate import Busy
from safesail.diagnose.schemas import DiagnoseRequest, ErrorResponse
from safesail.errors import UserError

router = APIRouter()


def _event(kind: str, data: str) -> str:
    return f"event: {kind}\ndata: {data}\n\n"


def sse_stream(request: Request, check, run) -> StreamingResponse:
    """Server-sent events around `run(engine, deadline, emit) -> pydantic model` holding the model.

    `check(engine)` validates the request first (a UserError there is a plain 400 answer);
    `emit(kind, obj)` sends an event while the work runs; the returned model is the `result`.
    """
    engine = engine_of(request)
    settings = request.app.state.settings
    try:
        check(engine)
    except UserError as e:
        raise ApiError(400, "bad_request", str(e)) from None
    deadline = time.perf_counter() + settings.request_timeout_s
    slot = request.app.state.gate.slot(settings.request_timeout_s)
    try:
        waited = slot.__enter__()
    except Busy as e:
        raise ApiError(503, "busy", f"the model is busy ({e}); try again in a moment.") from None
    events: queue.Queue = queue.Queue()

    def work():  # holds the model until done, even if the client goes away
        try:
            resp = run(engine, deadline, lambda kind, obj: events.put((kind, json.dumps(obj))))
            if hasattr(resp, "timings"):
                resp.timings.queue_s = waited
            events.put(("result", resp.model_dump_json()))
        except UserError as e:
            events.put(("error", ErrorResponse(error="bad_request", message=str(e)).model_dump_json()))
        except Exception as e:  # noqa: BLE001 - reported to the client, logged by the caller
            events.put(("error", ErrorResponse(error="internal", message=f"the request failed ({type(e).__name__}); "
                                                                         "see the server log.").model_dump_json()))
            raise
        finally:
            slot.__exit__(None, None, None)

    threading.Thread(target=work, daemon=True).start()

    def stream():
        while True:
            kind, data = events.get()
            yield _event(kind, data)
            if kind in ("result", "error"):
                return

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@router.post("/api/diagnose/stream", responses={**ERRORS, 200: {
    "content": {"text/event-stream": {}},
    "description": "events `token` {text}, then `result` (DiagnoseResponse) or `error` (ErrorResponse)"}},
    tags=["diagnose"])
def diagnose_stream(req: DiagnoseRequest, request: Request):
    def run(engine, deadline, emit):
        return engine.diagnose(req.query, req.answer, req.max_new_tokens, req.temperature, req.top, req.filters,
                               req.include_template, deadline=deadline,
                               on_text=lambda piece: emit("token", {"text": piece}))

    return sse_stream(request, lambda engine: engine.check_query(req.query), run)
