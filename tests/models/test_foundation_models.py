import pytest
import torch

from safesail.chat import encode_chat
from safesail.errors import UserError
from safesail.hooks import HookPoint, capture_activations, hook_points, special_token_mask


def _capture_watching_layer_3(lm, ids, points):
    """capture_activations (stopping early) with a hook on layer 3; returns (acts, seen): seen is [] when
    the forward pass never reached layer 3."""
    seen = []
    handle = lm.model.model.layers[3].register_forward_hook(lambda *a: seen.append(1))
    try:
        acts = capture_activations(lm.model, ids, None, points)
    finally:
        handle.remove()
    return acts, seen


def test_tiny_model_hooks_stop_early(tiny_model):
    lm = tiny_model
    ids = torch.tensor([encode_chat(lm.tokenizer, "How do I bake bread? 你好 नमस्ते", "sys")])
    acts, seen = _capture_watching_layer_3(lm, ids, hook_points([0, 1], "mlp_out", lm.num_layers))
    assert set(acts) == {"layers.0.mlp_out", "layers.1.mlp_out"}
    assert acts["layers.0.mlp_out"].shape == (1, ids.shape[1], lm.hidden_size)
    assert seen == []  # the forward pass stopped after layer 1
    mask = special_token_mask(lm.tokenizer, ids)
    assert mask[0, 0] and mask.sum() >= 4


def test_mlp_out_equals_down_proj_output(tiny_model):
    lm = tiny_model
    ids = torch.tensor([[5, 6, 7, 8]])
    got = {}
    h = lm.model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: got.setdefault("x", o))
    try:
        acts = capture_activations(lm.model, ids, None, [HookPoint(1)], stop_early=False)
    finally:
        h.remove()
    assert torch.equal(acts["layers.1.mlp_out"], got["x"])


def test_layer_out_of_range_is_one_sentence():
    with pytest.raises(UserError, match="out of range"):
        hook_points([0, 99], "mlp_out", 4)
    with pytest.raises(UserError, match="hook site"):
        hook_points([0], "attn", 4)
    with pytest.raises(UserError):
        HookPoint.parse("layer8")


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_hook_and_stop_early(arch, cache_dir):
    from safesail.config import compose
    from safesail.models import load_model

    cfg = compose(["experiment=smoke", f"model.architecture={arch}"])
    lm = load_model(cfg.model, "cpu", cache_dir=cache_dir)
    assert type(lm.model).__name__.lower().startswith(arch)
    ids = torch.tensor([encode_chat(lm.tokenizer, "What is the capital of France?", "sys")])
    acts, seen = _capture_watching_layer_3(lm, ids, hook_points([0, 2], "resid", lm.num_layers))
    assert seen == [] and set(acts) == {"layers.0.resid", "layers.2.resid"}
    # the residual stream after block L is hidden_states[L + 1] of a full forward pass
    full = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(acts["layers.2.resid"], full[3], atol=1e-5)
    assert torch.allclose(acts["layers.0.resid"], full[1], atol=1e-5)


def test_missing_model_folder_and_offline_hub_id_are_one_sentence(tmp_path, monkeypatch):
    from safesail.config import compose
    from safesail.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in (tmp_path / "nope", "Qwen/Qwen2.5-0.5B-Instruct"):
        cfg = compose(["model=hf", f"model.path={path}", "model.layers=[0]"])
        with pytest.raises(UserError) as e:
            load_model(cfg.model, "cpu")
        assert "\n" not in str(e.value) and str(e.value).endswith(".")
    (tmp_path / "empty").mkdir()
    cfg = compose(["model=hf", f"model.path={tmp_path / 'empty'}", "model.layers=[0]"])
    with pytest.raises(UserError, match="no config.json"):
        load_model(cfg.model, "cpu")
