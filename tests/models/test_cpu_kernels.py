"""`${if_bf16_fast:A,B}`: the configs that chose bf16 for CPU speed take float32 where bf16 has no native kernels."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from safesail.config import compose
from safesail.cpu_kernels import bf16_is_fast


def test_the_check_is_torchs_onednn_bf16_check_on_a_cpu_machine(monkeypatch):
    monkeypatch.delenv("SAFESAIL_BF16_FAST", raising=False)
    if torch.cuda.is_available():
        assert bf16_is_fast()
    else:
        assert bf16_is_fast() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_the_demo_and_the_embedded_llms_follow_the_machine(monkeypatch):
    monkeypatch.setenv("SAFESAIL_BF16_FAST", "1")
    fast = compose(["llm=qwen-coder-1.5b"])
    assert (fast.model.dtype, fast.train.autocast, fast.llm.model.dtype) == ("bfloat16", True, "bfloat16")
    assert compose(["experiment=qwen05b-refusal"]).model.dtype == "bfloat16"
    monkeypatch.setenv("SAFESAIL_BF16_FAST", "0")
    slow = compose(["llm=qwen-coder-0.5b"])
    assert (slow.model.dtype, slow.train.autocast, slow.llm.model.dtype) == ("float32", False, "float32")
    refusal = compose(["experiment=qwen05b-refusal"])
    assert (refusal.model.dtype, refusal.train.autocast) == ("float32", False)


def test_an_explicit_dtype_still_wins_and_the_saved_config_holds_the_resolved_value(monkeypatch):
    monkeypatch.setenv("SAFESAIL_BF16_FAST", "0")
    cfg = compose(["model.dtype=bfloat16", "train.autocast=true"])
    assert cfg.model.dtype == "bfloat16" and cfg.train.autocast is True
    saved = OmegaConf.to_yaml(compose([]), resolve=True)     # what rundir writes to config.yaml
    assert "if_bf16_fast" not in saved and "dtype: float32" in saved
