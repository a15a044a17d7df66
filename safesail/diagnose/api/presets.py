"""GET /api/compare/presets: prepared multilingual queries (data/queries/compare.jsonl)."""

import json
from pathlib import Path

from fastapi import APIRouter, Request

from safesail.diagnose.schemas import ComparePreset, PresetsResponse

router = APIRouter()
LANG_KEYS = ("en", "zh", "hi")


def load_presets(path: str | None) -> list[ComparePreset]:
    """Records {"id", "domain", "en", "zh", "hi"}; a missing file gives none, a bad line is skipped."""
    if not path or not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        queries = {k: str(rec[k]) for k in LANG_KEYS if rec.get(k)}
        if len(queries) >= 2:
            out.append(ComparePreset(id=str(rec.get("id", len(out))), domain=rec.get("domain"), queries=queries))
    return out


@router.get("/api/compare/presets", response_model=PresetsResponse, tags=["diagnose"])
def presets(request: Request) -> PresetsResponse:
    return PresetsResponse(presets=request.app.state.presets)
