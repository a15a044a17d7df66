"""GET /api/info: the model, the database's SAEs, the limits."""

from pathlib import Path

from fastapi import APIRouter, Request

from safesail.diagnose.api.common import engine_of
from safesail.diagnose.schemas import DOMAINS, InfoResponse, Limits, SAEInfo

router = APIRouter()


@router.get("/api/info", response_model=InfoResponse, tags=["diagnose"])
def info(request: Request) -> InfoResponse:
    engine = engine_of(request)
    s, st = engine.settings, request.app.state.settings
    mi = engine.db.model_info() or {}
    saes = [SAEInfo(hook=b.hook.name, layer=b.layer, arch=b.meta.get("arch"), k=b.meta.get("k"),
                    width=b.meta.get("width"), d_in=b.meta.get("d_in"), n_db_latents=len(b.latent_ids))
            for b in engine.saes]
    limits = Limits(max_query_chars=s.max_query_chars, max_prompt_tokens=s.max_prompt_tokens,
                    max_new_tokens=s.max_new_tokens, max_new_tokens_limit=s.max_new_tokens_limit,
                    max_body_bytes=st.max_body_bytes, queue_size=st.queue_size,
                    request_timeout_s=st.request_timeout_s)
    # The file name only: the absolute path would tell any page that can reach the API the user's folders.
    db_name = Path(engine.db_path).name if engine.db_path else ""
    return InfoResponse(model=engine.lm.name, db_model=mi.get("model"), db_path=db_name, saes=saes,
                        domains=list(DOMAINS), limits=limits, temperature=s.temperature, top=s.top)
