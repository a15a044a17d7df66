"""CE evaluation: one shared clean pass for several hooks equals the per-hook evaluation; jackknife SE."""

from __future__ import annotations

import math

import pytest
import torch

from safesail.saes import build_sae
from safesail.train.evaluate import evaluate_ce, evaluate_ce_hooks, jackknife_recovered_se, paired_increase_se

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shared_clean_pass_equals_per_hook(tiny_model):
    torch.manual_seed(0)
    vocab = tiny_model.model.config.vocab_size
    d = tiny_model.model.config.hidden_size
    windows = [torch.randint(3, vocab, (32,)) for _ in range(6)]
    saes = {h: [build_sae({"arch": "topk", "k": k, "d_in": d, "n_latents": 4 * d, "hook": h, "seed": k})
                for k in (2, 8)] for h in ("layers.0.mlp_out", "layers.1.mlp_out")}
    both = evaluate_ce_hooks(tiny_model.model, tiny_model.tokenizer, saes, windows, batch_size=4, progress=False)
    for hook, s in saes.items():
        alone = evaluate_ce(tiny_model.model, tiny_model.tokenizer, hook, s, windows, batch_size=4, progress=False)
        assert len(both[hook]) == 2
        for a, b in zip(alone, both[hook]):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
            assert a["ce_tokens"] == 6 * 31 and a["ce_loss_recovered_se"] > 0
            assert a["ce_loss_increase"] == pytest.approx(a["ce_loss_spliced"] - a["ce_loss_clean"], abs=1e-12)
            assert a["ce_loss_increase_se"] > 0


def test_jackknife_se():
    clean = torch.tensor([10.0, 11.0, 9.0, 10.5], dtype=torch.float64)
    zero = clean + torch.tensor([1.0, 1.2, 0.8, 1.1], dtype=torch.float64)
    # every window recovers exactly 80%: the ratio has no spread, so no error
    assert jackknife_recovered_se(clean, zero, zero - 0.8 * (zero - clean)) == pytest.approx(0.0, abs=1e-12)
    noisy = zero - torch.tensor([0.5, 1.2, 0.1, 1.1], dtype=torch.float64)
    se = jackknife_recovered_se(clean, zero, noisy)
    # the same figure as a hand-written delete-one jackknife
    full = [(zero.sum() - zero[i] - noisy.sum() + noisy[i]) / (zero.sum() - zero[i] - clean.sum() + clean[i])
            for i in range(4)]
    loo = torch.stack(full)
    assert se == pytest.approx(float((0.75 * (loo - loo.mean()).pow(2).sum()).sqrt()))
    assert math.isnan(jackknife_recovered_se(clean[:1], zero[:1], noisy[:1]))


def test_paired_increase_se():
    clean = torch.tensor([60.0, 62.0, 58.0, 61.0], dtype=torch.float64)   # per-window CE sums, 10 tokens each
    # every window pays exactly 0.1 nat per token: the increase has no spread, so no error
    assert paired_increase_se(clean, clean + 1.0, 40) == pytest.approx(0.0, abs=1e-12)
    spliced = clean + torch.tensor([0.5, 1.5, 1.0, 2.0], dtype=torch.float64)
    per_token = torch.tensor([0.05, 0.15, 0.10, 0.20], dtype=torch.float64)
    assert paired_increase_se(clean, spliced, 40) == pytest.approx(float(per_token.std(unbiased=True) / 2))
    assert math.isnan(paired_increase_se(clean[:1], spliced[:1], 10))
