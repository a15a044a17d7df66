"""`safesail serve`: the diagnose web page and its JSON API (FastAPI + uvicorn).

The page (static/) is plain HTML/JS/CSS with no build step and no network access;
it calls the same JSON API scripts use. Bound to 127.0.0.1 unless the config says
otherwise; no debug mode; one model shared by all requests behind a bounded queue.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from safesail.diagnose.api import ROUTERS
from safesail.diagnose.api.common import ApiError, ServerSettings, error_json
from safesail.diagnose.api.presets import load_presets
from safesail.diagnose.gate import ModelGate
from safesail.diagnose.guard import BodyTooLarge, GuardMiddleware, allowed_host_names
from safesail.errors import UserError

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
REPO = Path(__file__).resolve().parents[2]
API_VERSION = "1"

def _resolve_file(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    return str(REPO / p)


def create_app(engine, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app around a loaded `DiagnoseEngine` (None gives an app that only describes itself)."""
    settings = settings or ServerSettings()
    app = FastAPI(title="Safe-SAIL diagnose", version=API_VERSION, debug=False, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json",
                  description="Per-token safety latents of a chat LLM's query and answer, from a Safe-SAIL "
                              "neuron database.")
    app.state.engine = engine
    app.state.settings = settings
    app.state.gate = ModelGate(settings.queue_size)
    app.state.presets = load_presets(_resolve_file(settings.compare_file))
    for r in ROUTERS:
        app.include_router(r)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return error_json(exc.status, exc.code, exc.message)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request: Request, exc: BodyTooLarge):
        return error_json(413, "too_large", exc.detail)

    @app.exception_handler(UserError)
    async def _user_error(_request: Request, exc: UserError):
        return error_json(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_json(422, "invalid", f"{where or 'the request'}: {first.get('msg', 'is invalid')}; fix it and "
                                          "send again.")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(GuardMiddleware, max_bytes=settings.max_body_bytes,
                       allowed_hosts=allowed_host_names(settings.host, settings.allowed_hosts))
    return app


def openapi_json(app: FastAPI | None = None) -> str:
    """The API's OpenAPI document as checked in at docs/openapi.json."""
    app = app or create_app(None)
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def run_serve_stage(cfg, args: list[str]) -> None:
    import uvicorn

    from safesail.diagnose.engine import DiagnoseEngine

    p = argparse.ArgumentParser(prog="safesail serve", description="Serve the diagnose page and JSON API.")
    p.add_argument("--host", default=None, help="address to bind (default diagnose.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default diagnose.port)")
    p.add_argument("--openapi", metavar="FILE", help="write the OpenAPI document to FILE and exit")
    try:
        ns = p.parse_args(args)
    except SystemExit as e:
        if e.code:
            raise UserError("unknown arguments to `safesail serve`; see `safesail serve --help`.") from None
        raise
    settings = ServerSettings.from_cfg(cfg)
    if ns.openapi:
        Path(ns.openapi).write_text(openapi_json(create_app(None, settings)), encoding="utf-8")
        print(f"wrote {ns.openapi}")
        return
    settings.host = ns.host or settings.host
    settings.port = ns.port or settings.port
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can use the model", settings.host)
    engine = DiagnoseEngine.from_config(cfg)
    app = create_app(engine, settings)
    log.info("diagnose page at http://%s:%d/", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False,
                timeout_keep_alive=5, limit_concurrency=max(64, settings.queue_size * 4))
