"""What every endpoint shares: the app's state, error answers, the model gate."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from safesail.diagnose.gate import Busy, ModelGate
from safesail.diagnose.schemas import ErrorResponse
from safesail.errors import UserError

ERRORS = {400: {"model": ErrorResponse, "description": "bad input (one sentence says what to change)"},
          413: {"model": ErrorResponse, "description": "request body too large"},
          503: {"model": ErrorResponse, "description": "busy: the queue is full or the wait ran out"}}


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    queue_size: int = 4
    request_timeout_s: float = 120.0
    max_body_bytes: int = 65536
    compare_file: str | None = None
    allowed_hosts: list[str] | None = None  # Host names served; None: the names of the bound address

    @classmethod
    def from_cfg(cls, cfg) -> "ServerSettings":
        d = cfg.diagnose
        hosts = d.get("allowed_hosts")
        return cls(host=str(d.host), port=int(d.port), queue_size=int(d.queue_size),
                   request_timeout_s=float(d.request_timeout_s), max_body_bytes=int(d.max_body_bytes),
                   compare_file=d.get("compare_file"), allowed_hosts=[str(h) for h in hosts] if hosts else None)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_json(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=code, message=message).model_dump(), status_code=status)


def engine_of(request: Request):
    engine = request.app.state.engine
    if engine is None:
        raise ApiError(503, "no_model", "the server was started without a model; restart it with `safesail serve`.")
    return engine


def with_model(request: Request, fn):
    """Run `fn(engine, deadline)` holding the model; map busy/limits/user errors to JSON answers."""
    engine = engine_of(request)
    gate: ModelGate = request.app.state.gate
    settings: ServerSettings = request.app.state.settings
    deadline = time.perf_counter() + settings.request_timeout_s
    try:
        with gate.slot(settings.request_timeout_s) as waited:
            return fn(engine, deadline), waited
    except Busy as e:
        raise ApiError(503, "busy", f"the model is busy ({e}); try again in a moment.") from None
    except UserError as e:
        raise ApiError(400, "bad_request", str(e)) from None
