"""SAE architectures: forward/backward, save/load, scale folding, sparse gradients, file layouts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safesail.errors import UserError
from safesail.saes import SAEConfig, arch_names, build_sae, k_archs, list_saes, load_sae, save_sae
from safesail.saes.saelens import export_saelens
from safesail.saes.safesail_layout import load_safesail_checkpoint, save_safesail_checkpoint

# every registered architecture (a new file in safesail/saes/archs/ is picked up here): its defaults,
# k = 4 where it has a k, and settings that make every parameter get a gradient on random data
_KW = {"jumprelu": {"l0_coef": 0.01, "bandwidth": 0.5, "init_threshold": 0.3}, "relu": {"l1_coef": 0.1}}
ARCHS = [(a, {**({"k": 4} if a in k_archs() else {}), **_KW.get(a, {})}) for a in arch_names()]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(arch, kw, d=16, n=48, seed=0):
    sae = build_sae(dict(arch=arch, d_in=d, n_latents=n, hook="layers.1.mlp_out", model="tiny", seed=seed, **kw))
    with torch.no_grad():  # non-trivial biases so that round trips test them
        sae.b_enc.uniform_(-0.05, 0.1)
        sae.b_dec.normal_()
    return sae


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_forward_backward_updates_every_parameter(arch, kw):
    sae = make(arch, kw)
    x = torch.randn(64, 16) + 2.0
    out = sae.forward_with_loss(x, dead_mask=torch.ones(48, dtype=torch.bool))
    assert out.recon.shape == x.shape and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{arch}: no gradient reaches {name}"
    if arch.endswith("topk") and "batch" not in arch:
        assert out.l0.item() == pytest.approx(4.0, abs=0.5)


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_save_load_round_trip(tmp_path, arch, kw):
    sae = make(arch, kw)
    x = torch.randn(64, 16) + 1.0
    if hasattr(sae, "threshold_momentum"):  # batchtopk variants learn the inference threshold
        sae.train_codes(x - sae.b_dec)
    folder = save_sae(sae, tmp_path / "saes" / "layers.1.mlp_out" / sae.cfg.name, metrics={"fvu": 0.5})
    back = load_sae(folder)
    assert type(back) is type(sae) and back.cfg.name == sae.cfg.name and back.cfg.hook == "layers.1.mlp_out"
    z1, z2 = sae.eval().encode(x), back.encode(x)
    assert (z1 >= 0).all() and torch.equal(z1, z2)
    assert torch.equal(sae(x), back(x))
    assert list_saes(tmp_path / "saes") == [folder]
    assert json.loads((folder / "cfg.json").read_text())["format"] == "safesail-sae/1"


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_folding_the_scale_gives_raw_units(arch, kw):
    """An SAE trained on x*s, once folded, maps raw x to codes/s and to the raw reconstruction."""
    sae = make(arch, kw).eval()
    if hasattr(sae, "threshold_momentum"):
        with torch.no_grad():
            sae.threshold.fill_(0.05)
    x = torch.randn(32, 16) * 7.0
    s = 0.25
    z_scaled, r_scaled = sae.encode(x * s), sae(x * s)
    sae.fold_input_scale(s)
    torch.testing.assert_close(sae.encode(x), z_scaled / s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae(x), r_scaled / s, rtol=1e-4, atol=1e-4)
    assert sae.cfg.input_scale == pytest.approx(s)


def test_topk_sparse_backward_matches_dense_autograd():
    torch.manual_seed(0)
    sae = make("topk", {"k": 5}, d=16, n=64)
    x = torch.randn(40, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    sae.forward_with_loss(x, dead_mask=dead).loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    # the same loss written with dense autograd
    x_c = x - sae.b_dec
    pre = x_c @ sae.W_enc.T + sae.b_enc
    idx = pre.topk(5).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    tv = (x - x.mean(0)).pow(2).sum()
    e = x - (z @ sae.W_dec + sae.b_dec)
    k_aux = 8
    aidx = pre.detach().masked_fill(~dead[None], -math.inf).topk(k_aux).indices
    za = torch.zeros_like(pre).scatter(1, aidx, pre.gather(1, aidx).relu())
    aux = min(int(dead.sum()) / k_aux, 1.0) * ((za @ sae.W_dec) - e.detach()).pow(2).sum() / tv
    (e.pow(2).sum() / tv + aux / 32).backward()
    for n, p in sae.named_parameters():
        torch.testing.assert_close(sparse[n], p.grad, rtol=1e-4, atol=1e-5)


def test_dense_decoder_path_matches_sparse():
    sae = make("topk", {"k": 6})
    x = torch.randn(32, 16)
    sae.decoder_impl = "sparse"
    a = sae.forward_with_loss(x).loss
    a.backward()
    ga = sae.W_dec.grad.clone()
    sae.zero_grad()
    sae.decoder_impl = "dense"
    b = sae.forward_with_loss(x).loss
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    torch.testing.assert_close(ga, sae.W_dec.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch,kw", [("topk", {"k": 4}), ("jumprelu", {"l0_coef": 0.01})])
def test_safesail_layout_round_trip(tmp_path, arch, kw):
    sae = make(arch, kw).eval()
    path = save_safesail_checkpoint(sae, tmp_path / "ckpt_layer1.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["encoder.weight"].shape == (1, 48, 16) and raw["decoder.weight"].shape == (1, 16, 48)
    assert raw["pre_encoder_bias._bias_reference"].shape == (1, 16) and raw["encoder.bias"].shape == (1, 48)
    assert ("encoder.theta" in raw) == (arch == "jumprelu")
    back = load_safesail_checkpoint(path, arch="topk", k=4, hook="layers.1.mlp_out")
    assert back.cfg.arch == arch
    x = torch.randn(20, 16)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    torch.testing.assert_close(back(x), sae(x))


def test_safesail_layout_bad_file(tmp_path):
    p = tmp_path / "ckpt.pt"
    torch.save({"encoder.weight": torch.zeros(1, 4, 2)}, p)
    with pytest.raises(UserError, match="pre_encoder_bias"):
        load_safesail_checkpoint(p)
    with pytest.raises(UserError, match="does not exist"):
        load_safesail_checkpoint(tmp_path / "nope.pt")


def test_saelens_export_layout(tmp_path):
    from safetensors.torch import load_file

    sae = make("jumprelu", {"l0_coef": 0.01}).eval()
    folder = export_saelens(sae, tmp_path / "saelens")
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 16 and cfg["d_sae"] == 48
    assert cfg["hook_name"] == "model.layers.1.mlp.down_proj" and cfg["apply_b_dec_to_input"] is True
    assert w["W_enc"].shape == (16, 48) and w["W_dec"].shape == (48, 16) and w["threshold"].shape == (48,)
    x = torch.randn(10, 16)  # SAELens's JumpReLU encode from the exported tensors equals ours
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    torch.testing.assert_close(pre * (pre > w["threshold"]), sae.encode(x))


@pytest.mark.parametrize("bad,msg", [(dict(arch="topk", k=100), "larger than the SAE width"),
                                     (dict(arch="nope"), "unknown"),
                                     (dict(arch="topk", k=None), "needs k")])
def test_bad_configs(bad, msg):
    with pytest.raises(UserError, match=msg):
        build_sae(dict(d_in=8, n_latents=32, **bad))


def test_names_of_each_arch():
    names = [SAEConfig(arch=a, d_in=4, n_latents=8, **kw).validate().name for a, kw in
             [("topk", {"k": 2}), ("batchtopk", {"k": 2}), ("jumprelu", {"l0_coef": 0.001}), ("relu", {"l1_coef": 0.05})]]
    assert names == ["topk-k2", "batchtopk-k2", "jumprelu-l0_0.001", "relu-l1_0.05"]
    with pytest.raises(UserError, match="no cfg.json"):
        load_sae("/nonexistent/folder")
