"""Pursuit option `stop`: a token takes no more latents once its residual is a small share of it (k is then the most)."""

from __future__ import annotations

import pytest
import torch

from safesail.errors import UserError
from safesail.saes import build_sae, load_sae, save_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _orthonormal_sae(k, stop, n=16, d=16, refit="ls", select="decoder"):
    sae = build_sae(dict(arch="pursuit", d_in=d, n_latents=n, k=k, seed=0, refit=refit, select=select, stop=stop))
    q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3)))[0]
    with torch.no_grad():
        sae.W_dec.copy_(q[:n])
        sae.W_enc.copy_(q[:n])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _rows(sae, counts, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(len(counts), sae.cfg.n_latents)
    for i, c in enumerate(counts):
        j = torch.randperm(sae.cfg.n_latents, generator=g)[:c]
        z[i, j] = 0.5 + torch.rand(c, generator=g)
    return z, z @ sae.W_dec.detach()


@pytest.mark.parametrize("refit", ["ls", "none"])
def test_stop_takes_only_the_latents_a_token_needs(refit):
    sae = _orthonormal_sae(k=8, stop=1e-3, refit=refit)
    counts = [1, 2, 3, 5, 8, 4]
    z, x = _rows(sae, counts)
    with torch.no_grad():
        got = sae.encode(x)
    assert (got > 0).sum(1).tolist() == counts
    assert torch.allclose(got, z, atol=1e-3)


def test_stop_zero_is_plain_k():
    a, b = _orthonormal_sae(k=6, stop=0.0), _orthonormal_sae(k=6, stop=0.3)
    _, x = _rows(a, [2, 3, 6])
    x = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert ((a.encode(x) > 0).sum(1) == 6).all()
        assert ((b.encode(x) > 0).sum(1) < 6).all()


def test_stop_matches_a_row_by_row_reference_on_a_random_dictionary(omp_reference):
    sae = build_sae(dict(arch="pursuit", d_in=12, n_latents=40, k=6, seed=0, refit="ls", select="decoder",
                         stop=0.05))
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = sae.encode(x)
    want = omp_reference(sae, x)
    assert ((want > 0).sum(1) < 6).any()   # the stop decides some rows
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_stop_trains_with_gradients_and_round_trips(tmp_path):
    from safesail.train.trainer import TrainOptions, train_saes

    x = torch.randn(512, 12, generator=torch.Generator().manual_seed(0))
    [t] = train_saes([x[i:i + 64] for i in range(0, 512, 64)],
                     [dict(arch="pursuit", d_in=12, n_latents=24, k=6, refit="ls", select="decoder", stop=0.05,
                           seed=0, optimizer="adam")], TrainOptions(progress=False))
    assert "stop0.05" in t.sae.cfg.name or "stop0.05" in type(t.sae).folder_name(t.sae.cfg)
    save_sae(t.sae, tmp_path / "s")
    back = load_sae(tmp_path / "s")
    assert back.cfg.stop == 0.05
    with torch.no_grad():
        assert torch.allclose(back.encode(x[:20]), t.sae.encode(x[:20]), atol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, 1.0, "x"])
def test_bad_stop_is_one_clear_error(bad):
    with pytest.raises(UserError, match="stop"):
        build_sae(dict(arch="pursuit", d_in=8, n_latents=16, k=4, stop=bad))
