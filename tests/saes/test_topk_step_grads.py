"""The TopK training pass (sparse encoder/decoder backward, b_dec routed directly, AuxK dense over the
dead columns or as sparse gathers) gives the loss and every gradient of a plain dense reference."""

from __future__ import annotations

import math

import pytest
import torch

import safesail.saes.base as base
from safesail.saes import build_sae
from safesail.saes.sparse_ops import RowsPattern, dense_columns_codes, gather_preacts, sparse_rows_product

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_reference(sae, x, dead, total_var):
    """TopK + AuxK written with dense [b, n] tensors and plain autograd."""
    cfg = sae.cfg
    x_c = x - sae.b_dec
    pre = x_c @ sae.W_enc.t() + sae.b_enc
    idx = pre.detach().topk(cfg.k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx)).relu()
    recon = z @ sae.W_dec + sae.b_dec
    e = x - recon
    fvu = e.pow(2).sum() / total_var
    aux = fvu.new_zeros(())
    num_dead = int(dead.sum())
    if num_dead:
        k_aux = cfg.k_aux or cfg.d_in // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        ia = pre.detach().masked_fill(~dead[None], -math.inf).topk(k_aux, dim=1).indices
        za = torch.zeros_like(pre).scatter(1, ia, pre.gather(1, ia)).relu()
        aux = scale * (za @ sae.W_dec - e.detach()).pow(2).sum() / total_var
    return fvu + cfg.auxk_alpha * aux, aux


def _grads(sae):
    out = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    sae.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("n_dead,dense_ratio", [(0, 4.0), (3, 4.0), (12, 4.0), (24, 4.0), (24, 0.0), (200, 4.0)])
def test_topk_pass_equals_dense_reference(monkeypatch, n_dead, dense_ratio):
    """k_aux = 8: n_dead 3 (every dead column kept), 12 (dense, the smallest 4 dropped), 24 (dense, the
    top 8 kept), 200 (> 4 k_aux: sparse gathers); dense_ratio 0 forces the sparse branch."""
    monkeypatch.setattr(base, "AUXK_DENSE_RATIO", dense_ratio)
    torch.manual_seed(0)
    sae = build_sae({"arch": "topk", "k": 6, "d_in": 16, "n_latents": 256, "seed": 1, "auxk_alpha": 0.5})
    with torch.no_grad():   # a trained-looking state: non-zero biases, non-unit decoder
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
    x = torch.randn(64, 16) + 0.5
    total_var = (x - x.mean(0)).pow(2).sum()
    dead = torch.zeros(256, dtype=torch.bool)
    dead[torch.randperm(256)[:n_dead]] = True

    out = sae.forward_with_loss(x, dead_mask=dead, total_var=total_var)
    out.loss.backward()
    fast = _grads(sae)
    loss, aux = _dense_reference(sae, x, dead, total_var)
    loss.backward()
    ref = _grads(sae)
    torch.testing.assert_close(out.aux_loss, aux.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_gather_preacts_routes_b_dec_and_shares_the_pattern():
    torch.manual_seed(0)
    b, n, d, k = 32, 96, 12, 5
    x = torch.randn(b, d)
    w, bias, b_dec = (torch.randn(n, d, requires_grad=True), torch.randn(n, requires_grad=True),
                      torch.randn(d, requires_grad=True))
    coef = torch.randn(b, k)

    x_c = x - b_dec
    pre = torch.nn.functional.linear(x_c, w, bias)
    idx = pre.detach().topk(k, dim=1).indices
    (pre.gather(1, idx) * coef).sum().backward()
    ref = [t.grad.clone() for t in (w, bias, b_dec)]
    for t in (w, bias, b_dec):
        t.grad = None
    pattern = RowsPattern(idx, n)
    x_c = (x - b_dec).detach()
    vals = gather_preacts(x_c, w, bias, idx, pre.detach().gather(1, idx), b_dec=b_dec, pattern=pattern)
    (vals * coef).sum().backward()
    for a, r in zip((w.grad, bias.grad, b_dec.grad), ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    csr = pattern.csr()
    assert pattern.csr() is csr   # built once
    torch.testing.assert_close(sparse_rows_product(idx, coef, x, n, pattern), sparse_rows_product(idx, coef, x, n))


def test_dense_columns_codes_gradient():
    torch.manual_seed(0)
    b, n, d = 20, 50, 8
    x = torch.randn(b, d)
    w, bias, b_dec = (torch.randn(n, d, requires_grad=True), torch.randn(n, requires_grad=True),
                      torch.randn(d, requires_grad=True))
    cols = torch.tensor([3, 7, 11, 40])
    g = torch.randn(b, 4)
    pre = (x - b_dec) @ w[cols].t() + bias[cols]
    (pre.relu() * g).sum().backward()
    ref = [t.grad.clone() for t in (w, bias, b_dec)]
    for t in (w, bias, b_dec):
        t.grad = None
    z = dense_columns_codes((x - b_dec).detach(), b_dec, w, bias, cols, pre.detach().relu())
    (z * g).sum().backward()
    for a, r in zip((w.grad, bias.grad, b_dec.grad), ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
