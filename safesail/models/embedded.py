"""The models that ship inside PyPI wheels, by the `model.source` name that selects them.

`smollm2` is the embedded default source model; `qwen-coder-1.5b` and `qwen-coder-0.5b`
are the embedded explainer/simulator/tagger (configs/llm/qwen-coder-*.yaml).
"""

from __future__ import annotations

import os
from pathlib import Path

from safesail.models.gguf_wheels import GGUFWheelModel, ensure_gguf_model
from safesail.models.qwen_coder import QWEN_CODER_0_5B, QWEN_CODER_1_5B
from safesail.models.smollm2 import SMOLLM2

EMBEDDED: dict[str, GGUFWheelModel] = {
    "smollm2": SMOLLM2,
    "qwen-coder-1.5b": QWEN_CODER_1_5B,
    "qwen-coder-0.5b": QWEN_CODER_0_5B,
}


def ensure_embedded(source: str, cache_dir: str | os.PathLike) -> Path:
    """The converted folder of the embedded model `source` (fetched and converted on first use)."""
    return ensure_gguf_model(EMBEDDED[source], Path(cache_dir))
