"""Pursuit SAE: greedy rounds against the residual (one round = TopK), its gradients, AuxK on the residual."""

from __future__ import annotations

import pytest
import torch

from safesail.errors import UserError
from safesail.saes import SAEConfig, build_sae, load_sae, save_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(k=4, rounds=None, d=12, n=40, seed=0):
    sae = build_sae(dict(arch="pursuit", d_in=d, n_latents=n, k=k, rounds=rounds, seed=seed))
    with torch.no_grad():
        sae.b_enc.uniform_(-0.05, 0.1)
        sae.b_dec.normal_(std=0.3)
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))   # untied, as after training
    return sae


def _reference(sae, x):
    """Matching pursuit row by row, `k / rounds` latents a round, as plain Python: (codes [rows, n], idx per row)."""
    z = torch.zeros(x.shape[0], sae.cfg.n_latents)
    for i, row in enumerate(x):
        r = row - sae.b_dec
        taken: list[int] = []
        for m in sae._schedule():
            pre = sae.W_enc @ r + sae.b_enc
            pre[taken] = float("-inf")
            for j in pre.topk(m).indices.tolist():
                v = torch.relu(sae.W_enc[j] @ r + sae.b_enc[j])
                z[i, j] = v
                taken.append(j)
            r = row - sae.b_dec - z[i] @ sae.W_dec
    return z


@pytest.mark.parametrize("k,rounds", [(4, None), (4, 2), (5, 3)])
def test_encode_is_greedy_pursuit_on_the_residual(k, rounds):
    sae = _sae(k, rounds)
    x = torch.randn(30, 12)
    with torch.no_grad():
        got, want = sae.encode(x), _reference(sae, x)
    assert torch.allclose(got, want, atol=1e-5)
    assert ((got > 0).sum(1) <= k).all()


def test_one_round_is_topk():
    p = _sae(4, 1)
    t = build_sae(dict(arch="topk", d_in=12, n_latents=40, k=4, seed=0))
    t.load_state_dict(p.state_dict())
    x = torch.randn(30, 12)
    with torch.no_grad():
        assert torch.allclose(p.encode(x), t.encode(x), atol=1e-6)


def test_pursuit_undoes_interference_that_topk_cannot():
    """Two unit atoms at cosine 0.8 and their sum: TopK with the atoms as encoder rows gives each the
    code 1.8 (each reads the other too; error 1.52); pursuit takes one at 1.8 and reads the other off
    what is left, 0.36 (error 0.48)."""
    d = 8
    a = torch.zeros(2, d)
    a[0, 0] = 1.0
    a[1, 0], a[1, 1] = 0.8, 0.6
    sae = build_sae(dict(arch="pursuit", d_in=d, n_latents=2, k=2))
    top = build_sae(dict(arch="topk", d_in=d, n_latents=2, k=2))
    for s in (sae, top):
        with torch.no_grad():
            s.W_enc.copy_(a)
            s.W_dec.copy_(a)
    x = (a[0] + a[1])[None]
    with torch.no_grad():
        assert torch.allclose(top.encode(x), torch.tensor([[1.8, 1.8]]), atol=1e-5)
        assert torch.allclose(sae.encode(x).sort(dim=1).values, torch.tensor([[0.36, 1.8]]), atol=1e-5)
        assert (sae(x) - x).norm().item() == pytest.approx(0.48, abs=1e-4)
        assert (top(x) - x).norm().item() == pytest.approx(1.5179, abs=1e-3)


def test_training_gradients_match_dense_autograd_through_the_rounds():
    """With the chosen latents fixed, the loss is a function of every weight through the residual; the
    sparse training pass must give the gradients of that function computed densely."""
    sae = _sae(4, 2)
    x = torch.randn(25, 12) + 0.5
    out = sae.forward_with_loss(x)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    with torch.no_grad():
        support = sae.encode(x) != 0
        _, idx, _ = sae._pursue(x - sae.b_dec, grad=False)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    W_enc, b_enc, W_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    r = x - b_dec
    z = torch.zeros(x.shape[0], sae.cfg.n_latents)
    start = 0
    for m in sae._schedule():
        j = idx[:, start:start + m]
        rows = torch.arange(x.shape[0])[:, None].expand_as(j)
        mask = torch.zeros_like(z).index_put((rows, j), torch.ones_like(j, dtype=torch.float))
        v = ((r @ W_enc.T + b_enc) * mask).relu()
        z = z + v
        r = x - b_dec - z @ W_dec
        start += m
    assert torch.equal(z.detach() != 0, support)
    tv = (x - x.mean(0)).pow(2).sum()
    ((x - (z @ W_dec + b_dec)).pow(2).sum() / tv).backward()
    for n, p in params.items():
        assert torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_auxk_reads_dead_latents_off_the_last_residual():
    sae = _sae(3, 3)
    x = torch.randn(20, 12)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[30:] = True                                  # 10 dead latents <= k_aux (6): top 6 of them per row
    sae.cfg.k_aux = 6
    out = sae.forward_with_loss(x, dead_mask=dead)
    with torch.no_grad():
        r = sae._residual
        e = x - out.recon
        pre = (r @ sae.W_enc[30:].T + sae.b_enc[30:])
        top = pre.topk(6, dim=1)
        zd = torch.zeros_like(pre).scatter(1, top.indices, top.values).relu()
        tv = (x - x.mean(0)).pow(2).sum()
        want = (zd @ sae.W_dec[30:] - e).pow(2).sum() / tv
        assert torch.allclose(r, x - sae.b_dec - sae.encode(x) @ sae.W_dec, atol=1e-5)
    assert out.aux_loss.item() == pytest.approx(float(want), rel=1e-4)


def test_settings_name_round_trip_and_bad_rounds(tmp_path):
    c = SAEConfig(arch="pursuit", d_in=4, n_latents=16, k=4).validate()
    assert c.rounds == 4 and c.name == "pursuit-k4-r4"
    assert SAEConfig(arch="pursuit", d_in=4, n_latents=16, k=6, rounds=2).validate().name == "pursuit-k6-r2"
    for bad in (0, 5, "x"):
        with pytest.raises(UserError, match="rounds"):
            SAEConfig(arch="pursuit", d_in=4, n_latents=16, k=4, rounds=bad).validate()
    sae = _sae(4, 2)
    back = load_sae(save_sae(sae, tmp_path / sae.cfg.name))
    x = torch.randn(10, 12)
    with torch.no_grad():
        assert back.cfg.rounds == 2 and torch.equal(back.encode(x), sae.eval().encode(x))
