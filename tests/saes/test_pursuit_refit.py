"""Pursuit options: least-squares refit after every round (OMP), decoder selection, projected-gradient refinement."""

from __future__ import annotations

import pytest
import torch

from safesail.errors import UserError
from safesail.saes import SAEConfig, build_sae, load_sae, save_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(k=4, rounds=None, d=12, n=40, seed=0, **kw):
    sae = build_sae(dict(arch="pursuit", d_in=d, n_latents=n, k=k, rounds=rounds, seed=seed, **kw))
    with torch.no_grad():
        sae.b_enc.uniform_(-0.05, 0.1)
        sae.b_dec.normal_(std=0.3)
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
    return sae


@pytest.mark.parametrize("k,rounds,select", [(4, None, "encoder"), (4, 2, "encoder"), (5, 5, "decoder")])
def test_ls_refit_is_orthogonal_matching_pursuit(k, rounds, select, omp_reference):
    sae = _sae(k, rounds, refit="ls", select=select)
    x = torch.randn(30, 12)
    with torch.no_grad():
        got = sae.encode(x)
    assert torch.allclose(got.double(), omp_reference(sae, x), atol=1e-4)


def test_ls_refit_reconstructs_at_least_as_well_as_plain_pursuit():
    plain, omp = _sae(4), _sae(4, refit="ls")
    omp.load_state_dict(plain.state_dict())
    x = torch.randn(200, 12)
    with torch.no_grad():
        e_plain = (plain(x) - x).pow(2).sum()
        e_omp = (omp(x) - x).pow(2).sum()
    assert e_omp < e_plain


def test_refine_moves_codes_to_nonnegative_least_squares_on_the_support():
    """Many projected-gradient steps reach the KKT point of min |x - v D|^2, v >= 0, on the chosen rows:
    zero gradient on positive codes, non-negative gradient on the codes at 0."""
    sae = _sae(4, refine=400)
    x = torch.randn(20, 12)
    with torch.no_grad():
        v, j = sae.encode_sparse(x)
        D = sae.W_dec[j]                                        # [b, k, d]
        r = x - sae.b_dec - torch.einsum("bm,bmd->bd", v, D)
        grad = -torch.einsum("bmd,bd->bm", D, r)                # d/dv of |r|^2 / 2
    assert grad[v > 1e-6].abs().max() < 1e-3
    assert (grad[v <= 1e-6] > -1e-3).all()
    plain = _sae(4)
    plain.load_state_dict(sae.state_dict())
    with torch.no_grad():
        assert (sae(x) - x).pow(2).sum() <= (plain(x) - x).pow(2).sum() + 1e-5


@pytest.mark.parametrize("kw", [dict(refit="ls"), dict(refit="ls", select="decoder"), dict(refine=3)])
def test_gradients_match_finite_differences(kw):
    """With the chosen latents fixed (a small perturbation keeps them), the training loss is smooth in the
    weights: its autograd gradient must match central differences (float64)."""
    sae = _sae(3, **kw).double()
    x = torch.randn(8, 12, dtype=torch.float64) + 0.5

    def loss():   # the training reconstruction error, in float64 (forward_with_loss sums it in float32)
        c = sae.train_codes(x - sae.b_dec)
        return (x - sae.b_dec - torch.einsum("bm,bmd->bd", c.vals, sae.W_dec[c.idx])).pow(2).sum()

    out = loss()
    out.backward()
    for name in ("W_dec", "b_dec") + (("W_enc", "b_enc") if "refit" not in kw else ()):
        p = getattr(sae, name)
        flat = p.data.view(-1)
        for i in torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(1))[:6].tolist():
            old = float(flat[i])
            with torch.no_grad():
                flat[i] = old + 1e-6
                up = float(loss())
                flat[i] = old - 1e-6
                down = float(loss())
                flat[i] = old
            assert float(p.grad.view(-1)[i]) == pytest.approx((up - down) / 2e-6, rel=1e-3, abs=1e-6), (name, i)


def test_ls_refit_trains_and_round_trips(tmp_path):
    """A few training steps lower the loss, and a saved refit SAE loads with its options and encodes the same."""
    from safesail.train.trainer import TrainOptions, train_saes

    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(24, 8, generator=g), dim=1)
    on = (torch.rand(40 * 64, 24, generator=g) < 3 / 24).float() * (torch.rand(40 * 64, 24, generator=g) + 0.5)
    data = list((on @ atoms).split(64))
    cfg = dict(arch="pursuit", d_in=8, n_latents=24, k=3, refit="ls", select="decoder", refine=2, lr=3e-3)
    [t] = train_saes(data, [cfg], TrainOptions(lr_warmup_steps=2, progress=False))
    curve = t.metrics["train_fvu_curve"]
    assert curve[-1][1] < curve[0][1]
    assert t.sae.cfg.name == "pursuit-k3-r3-ls-seldecoder-i2"
    back = load_sae(save_sae(t.sae, tmp_path / t.sae.cfg.name))
    x = data[0]
    with torch.no_grad():
        assert (back.cfg.refit, back.cfg.select, back.cfg.refine) == ("ls", "decoder", 2)
        assert torch.allclose(back.encode(x), t.sae.encode(x), atol=1e-6)


def test_bad_options_say_what_to_use():
    for kw, word in ((dict(refit="qr"), "refit"), (dict(select="both"), "select"), (dict(refine=-1), "refine"),
                     (dict(refine="x"), "refine")):
        with pytest.raises(UserError, match=word):
            SAEConfig(arch="pursuit", d_in=4, n_latents=16, k=4, **kw).validate()
    assert SAEConfig(arch="pursuit", d_in=4, n_latents=16, k=4).validate().name == "pursuit-k4-r4"
