"""Duplicate split (safesail/train/split.py): one of two near-identical latents moves to what the pair leaves unexplained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from safesail.saes import build_sae
from safesail.train.optim import make_optimizer
from safesail.train.split import duplicate_pairs, split_duplicates
from safesail.train.trainer import TrainOptions, job_fingerprint, train_saes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pairs_are_disjoint_and_most_similar_first():
    w = F.normalize(torch.tensor([[1.0, 0, 0], [0.999, 0.04, 0], [0.95, -0.3, 0], [0, 0, 1.0]]), dim=1)
    assert duplicate_pairs(w, 0.9) == [(0, 1)]          # 0-1 closest; 2's partners are taken
    assert duplicate_pairs(w, 0.9995) == []


def test_the_less_used_duplicate_moves_to_the_residual_of_the_pair_rows():
    g = torch.Generator().manual_seed(0)
    d = 8
    a = F.normalize(torch.randn(d, generator=g), dim=0)
    b = F.normalize(a + 1.2 * F.normalize(torch.randn(d, generator=g), dim=0), dim=0)   # a neighbour of a
    sae = build_sae(dict(arch="topk", d_in=d, n_latents=6, k=1, seed=0))
    with torch.no_grad():
        sae.W_dec[0] = a
        sae.W_dec[1] = F.normalize(a + 0.01 * torch.randn(d, generator=g), dim=0)     # duplicate of 0
        sae.W_enc.copy_(sae.W_dec * 0.5)
    opt = make_optimizer("adam", sae.parameters(), lr=1e-3)
    sae.forward_with_loss(torch.randn(4, d)).loss.backward()
    opt.step()
    x = torch.rand(64, 1, generator=g) * a + (torch.rand(64, 1, generator=g) < 0.5) * b
    with torch.no_grad():
        idx = torch.zeros(64, 1, dtype=torch.long)
        idx[:16] = 1                                        # latent 1 fires on fewer rows: it is the one to move
        vals = (x @ a)[:, None]
        recon = vals * a
        before0 = sae.W_dec[0].clone()
        enc_norm = sae.W_enc[1].norm()
        assert split_duplicates(sae, opt, x, recon, idx, vals, cos=0.9) == 1
        e = x - recon
        top = torch.linalg.svd(e, full_matrices=False).Vh[0]
        assert abs(float(sae.W_dec[1] @ top)) == pytest.approx(1.0, abs=1e-5)
        assert float((e @ sae.W_dec[1]).mean()) > 0                           # points the way the residual does
        assert float(sae.W_dec[1] @ b) > float(sae.W_dec[1] @ a)             # toward the missing neighbour
        assert torch.equal(sae.W_dec[0], before0)
        assert float(sae.W_enc[1].norm()) == pytest.approx(float(enc_norm), rel=1e-5)
        assert float(opt.state[sae.W_dec]["exp_avg"][1].abs().sum()) == 0.0
        assert float(opt.state[sae.W_dec]["exp_avg"][0].abs().sum()) > 0.0


def test_trainer_splits_only_when_asked_and_fingerprints_stay():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 8, generator=g) for _ in range(12)]
    cfg = dict(arch="topk", d_in=8, n_latents=16, k=2, seed=0)
    base = TrainOptions(total_steps=12, lr_warmup_steps=1, progress=False)
    on = TrainOptions(total_steps=12, lr_warmup_steps=1, progress=False, split_every=2, split_cos=0.0,
                      resample_until=1.0)
    [t] = train_saes(data, [cfg], on)
    assert t.metrics["split"] > 0 and "split" not in train_saes(data, [cfg], base)[0].metrics
    from safesail.saes import SAEConfig
    c = [SAEConfig.from_dict(dict(cfg)).validate()]
    assert job_fingerprint(c, base) != job_fingerprint(c, on)
    assert job_fingerprint(c, base) == job_fingerprint(c, TrainOptions(total_steps=12, lr_warmup_steps=1,
                                                                       progress=False, split_cos=0.5))
