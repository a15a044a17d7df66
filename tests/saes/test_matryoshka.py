"""Matryoshka SAEs: the nested-prefix loss, its settings, and that the first prefix learns on its own."""

from __future__ import annotations

import pytest
import torch

from safesail.errors import UserError
from safesail.saes import SAEConfig, build_sae
from safesail.train.sweep import entry_config, sweep_entries

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_is_full_fvu_plus_each_inner_prefix_fvu():
    sae = build_sae(dict(arch="matryoshka_topk", d_in=8, n_latents=32, k=6, prefixes=[0.25, 0.5, 1.0]))
    x = torch.randn(50, 8)
    out = sae.forward_with_loss(x)
    with torch.no_grad():
        z = sae.encode(x)
        tv = (x - x.mean(0)).pow(2).sum()
        want = sum(((z[:, :m] @ sae.W_dec[:m] + sae.b_dec - x).pow(2).sum() / tv) for m in (8, 16, 32))
    assert out.loss.item() == pytest.approx(float(want), rel=1e-4)
    assert out.fvu.item() == pytest.approx(float((sae(x) - x).pow(2).sum() / tv), rel=1e-4)
    out.loss.backward()
    assert sae.W_dec.grad[:8].abs().sum() > 0


def test_names_settings_and_bad_prefixes():
    c = SAEConfig(arch="matryoshka_batchtopk", d_in=4, n_latents=64, k=8).validate()
    assert c.name == "matryoshka_batchtopk-k8" and c.prefixes == (0.0625, 0.25, 1.0)
    assert SAEConfig.from_dict(c.to_dict()) == c
    for bad, msg in (([0.5, 0.25, 1.0], "increasing"), ([0.25, 0.5], "ending in 1.0"), ("x", "fractions")):
        with pytest.raises(UserError, match=msg):
            SAEConfig(arch="matryoshka_topk", d_in=4, n_latents=64, k=8, prefixes=bad).validate()
    with pytest.raises(UserError, match="unknown key 'l1_coef' for architecture matryoshka_topk"):
        entry_config({"arch": "matryoshka_topk", "k": 4, "l1_coef": 0.1}, {"d_in": 4, "n_latents": 64})


def test_a_sweep_entry_keeps_prefixes_as_one_setting():
    entries = sweep_entries({"saes": [{"arch": "matryoshka_topk", "k": [4, 8], "prefixes": [0.25, 1.0]},
                                      {"arch": "matryoshka_topk", "k": 4, "prefixes": [[0.5, 1.0], [0.25, 1.0]]}]})
    assert [(e["k"], e["prefixes"]) for e in entries] == [(4, [0.25, 1.0]), (8, [0.25, 1.0]), (4, [0.5, 1.0]),
                                                           (4, [0.25, 1.0])]


def test_first_prefix_reconstructs_alone_better_than_plain_topk():
    """On data with a few frequent and many rare directions, the first 1/8 of a Matryoshka SAE's
    latents reconstruct far better on their own than the first 1/8 of a TopK SAE's."""
    from safesail.train.trainer import TrainOptions, train_saes

    g = torch.Generator().manual_seed(0)
    d, n_atoms = 16, 64
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    freq = torch.tensor([0.5] * 4 + [0.03] * (n_atoms - 4))
    def sample(rows):
        on = torch.rand(rows, n_atoms, generator=g) < freq
        return (on * torch.rand(rows, n_atoms, generator=g).add(0.5)) @ atoms
    batches = [sample(512) for _ in range(150)]
    held = sample(2048)
    common = dict(d_in=d, n_latents=64, k=4, seed=1)
    mat, top = train_saes(batches, [dict(arch="matryoshka_topk", prefixes=[0.125, 1.0], **common),
                                    dict(arch="topk", **common)], TrainOptions(progress=False, lr_warmup_steps=5))

    def prefix_fvu(sae, m=8):
        with torch.no_grad():
            z = sae.sae.encode(held)
            r = z[:, :m] @ sae.sae.W_dec[:m] + sae.sae.b_dec
            return float((held - r).pow(2).sum() / (held - held.mean(0)).pow(2).sum())

    assert prefix_fvu(mat) < 0.7 * prefix_fvu(top)
    assert mat.metrics["train_fvu"] < 0.5
