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
    for p in sae.parameters():
        p.grad = torch.ones_like(p)
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


def test_coherence_penalty_acts_only_above_the_threshold_and_pushes_rows_apart():
    from safesail.train.split import coherence_penalty

    w = F.normalize(torch.tensor([[1.0, 0, 0], [0.95, 0.3122, 0], [0, 0, 1.0], [0, 0.6, 0.8]]), dim=1)
    c01 = float(w[0] @ w[1])                               # 0.95; the other pairs are at <= 0.8
    assert float(coherence_penalty(w, 0.96)) == 0.0
    assert float(coherence_penalty(w, 0.9)) == pytest.approx((c01 - 0.9) ** 2 / 4, rel=1e-4)
    p = w.clone().requires_grad_(True)
    coherence_penalty(p, 0.9).backward()
    with torch.no_grad():
        q = F.normalize(p - 0.1 * p.grad, dim=1)
    assert float(q[0] @ q[1]) < c01
    assert torch.equal(p.grad[2], torch.zeros(3))
    [t] = train_saes([torch.randn(32, 3) for _ in range(4)], [dict(arch="topk", d_in=3, n_latents=4, k=1)],
                     TrainOptions(progress=False, coherence_coef=1.0, coherence_cos=0.5))
    assert t.metrics["steps"] == 4


def test_a_mixture_latent_is_split_between_itself_and_a_dead_donor():
    """Latent 0 sits between atoms a and b (it fires on the rows of either); latent 3 is dead. After the split
    one of them is a and the other b; a latent on a single atom scores near 0 and is left alone."""
    from safesail.train.split import mixture_scores, split_mixtures

    g = torch.Generator().manual_seed(0)
    d = 16
    a, b, c = F.normalize(torch.randn(3, d, generator=g), dim=1)
    sae = build_sae(dict(arch="topk", d_in=d, n_latents=4, k=1, seed=0))
    with torch.no_grad():
        sae.W_dec.copy_(F.normalize(torch.randn(4, d, generator=g), dim=1))
        sae.W_dec[0] = F.normalize(a + b, dim=0)
        sae.W_dec[1] = c
        sae.W_enc.copy_(sae.W_dec * 0.7)
        sae.b_enc.copy_(torch.tensor([-0.1, 0.0, 0.0, 0.0]))
    opt = make_optimizer("adam", sae.parameters(), lr=1e-3)
    which = torch.arange(60) % 3                              # rows of a, of b, of c
    mag = torch.rand(60, generator=g) + 0.5
    x = mag[:, None] * torch.stack([a, b, c])[which]
    idx = torch.where(which == 2, 1, 0)[:, None]
    with torch.no_grad():
        vals = (x * sae.W_dec[idx[:, 0]]).sum(1, keepdim=True)
        recon = vals * sae.W_dec[idx[:, 0]]
        score, rows = mixture_scores(sae, x, recon, idx, vals)
        assert float(score[1]) == pytest.approx(0.0, abs=1e-5) and float(score[0]) > 0.3
        donors = torch.tensor([False, False, False, True])
        assert split_mixtures(sae, opt, x, recon, idx, vals, donors) == [3]
        got = sorted([float(sae.W_dec[0] @ a), float(sae.W_dec[3] @ b)] if float(sae.W_dec[0] @ a) > 0.9
                     else [float(sae.W_dec[0] @ b), float(sae.W_dec[3] @ a)])
        assert got[0] > 0.999
        assert torch.equal(sae.W_dec[1], c) and float(sae.b_enc[3]) == pytest.approx(-0.1)
        assert float(sae.W_enc[3].norm()) == pytest.approx(0.7, rel=1e-5)
    [t] = train_saes([torch.randn(32, 8, generator=g) for _ in range(8)], [dict(arch="topk", d_in=8, n_latents=32, k=2)],
                     TrainOptions(progress=False, total_steps=8, mix_split_every=2, resample_until=1.0, dead_tokens=32))
    assert t.metrics["split"] >= 0 and t.metrics["steps"] == 8


def test_omp_with_the_duplicate_split_recovers_a_small_planted_dictionary():
    """The session-5 planted recipe on a small dictionary (48 atoms in d 16, 3 a row): OMP (pursuit with
    `refit: ls`, `select: decoder`) plus the duplicate split recovers more atoms than OMP alone, no latent dead."""
    from safesail.train.planted import PlantedData, Variant, mmcs

    p = PlantedData(Variant(d=16, n_atoms=48, active=3, share=0.2, power=0.5))
    data = p.batches(128, 128 * 300)
    cfg = dict(arch="pursuit", d_in=16, n_latents=48, k=3, refit="ls", select="decoder", optimizer="adam")
    got = {}
    for every in (0, 10):
        [t] = train_saes(data, [cfg], TrainOptions(progress=False, split_every=every, split_cos=0.8, resample_until=0.9))
        got[every] = mmcs(t.sae.W_dec, p.atoms)
        with torch.no_grad():
            assert ((t.sae.encode(p.sample(2048)) > 0).sum(0) > 0).all()
    assert got[10] >= 0.96 and got[10] > got[0] + 0.005
