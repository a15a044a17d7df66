"""AuxK over the dead columns only equals the masked full top-k; dead-latent resampling."""

from __future__ import annotations

import math

import pytest
import torch

from safesail.saes import build_sae
from safesail.saes.sparse_ops import gather_preacts, sparse_decode
from safesail.train.optim import make_optimizer
from safesail.train.planted import PlantedData
from safesail.train.resample import resample_dead
from safesail.train.trainer import TrainOptions, train_saes

pytestmark = pytest.mark.usefixtures("one_thread")


def _auxk_masked(sae, pre, e, dead_mask, total_var, x_c):
    """The former AuxK: top-k of all pre-activations with the live ones masked to -inf."""
    num_dead = int(dead_mask.sum())
    k_aux = sae.cfg.k_aux or sae.cfg.d_in // 2
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)
    top, idx = pre.masked_fill(~dead_mask[None], -math.inf).topk(k_aux, dim=1, sorted=False)
    vals = gather_preacts(x_c, sae.W_enc, sae.b_enc, idx, top.clone()).relu()
    return scale * (sparse_decode(vals, idx, sae.W_dec).float() - e.detach()).pow(2).sum() / total_var


@pytest.mark.parametrize("n_dead", [3, 40, 200])
def test_auxk_on_dead_columns_equals_masked_topk(n_dead):
    torch.manual_seed(0)
    sae = build_sae({"arch": "topk", "k": 4, "d_in": 16, "n_latents": 256, "seed": 1})
    x = torch.randn(64, 16)
    e = torch.randn(64, 16)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[torch.randperm(256)[:n_dead]] = True
    tv = torch.tensor(100.0)

    def inputs():
        x_c = x - sae.b_dec
        with torch.no_grad():
            pre = torch.nn.functional.linear(x_c, sae.W_enc, sae.b_enc)
        return pre, x_c

    pre, x_c = inputs()
    new = sae._auxk(pre, e, dead, tv, x_c)
    new.backward()
    g_new = sae.W_enc.grad.clone()
    sae.zero_grad()
    pre, x_c = inputs()
    old = _auxk_masked(sae, pre, e, dead, tv, x_c)
    old.backward()
    torch.testing.assert_close(new, old)
    torch.testing.assert_close(g_new, sae.W_enc.grad)


@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_resample_dead_reinitialises_toward_errors_and_resets_state(optimizer):
    torch.manual_seed(0)
    sae = build_sae({"arch": "topk", "k": 4, "d_in": 16, "n_latents": 64, "seed": 1})
    opt = make_optimizer(optimizer, sae.parameters(), lr=1e-2)
    x = torch.randn(32, 16)
    for _ in range(3):
        opt.zero_grad()
        sae.forward_with_loss(x).loss.backward()
        opt.step()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[2, 5, 9]] = True
    recon = torch.zeros_like(x)
    recon[:31] = x[:31]                    # only row 31 is badly reconstructed: every draw picks it
    before = sae.W_dec.detach().clone()
    assert resample_dead(sae, opt, dead, x, recon) == 3
    unit = x[31] / x[31].norm()
    for j in (2, 5, 9):
        torch.testing.assert_close(sae.W_dec[j].detach(), unit)
        assert float(sae.b_enc[j].detach()) == 0.0
        assert torch.nn.functional.cosine_similarity(sae.W_enc[j], unit, dim=0) > 0.999
    torch.testing.assert_close(sae.W_dec[~dead].detach(), before[~dead])   # live latents untouched
    st = opt.state[sae.W_dec]
    if optimizer == "signum":
        torch.testing.assert_close(st["z"][dead], sae.W_dec[dead].detach())
        with opt.eval_params():            # the schedule-free average restarts at the new rows
            torch.testing.assert_close(sae.W_dec[dead].detach(), unit.expand(3, -1))
    else:
        assert float(st["exp_avg"][dead].abs().sum()) == 0 and float(st["exp_avg_sq"][dead].abs().sum()) == 0
    assert resample_dead(sae, opt, torch.zeros(64, dtype=torch.bool), x, recon) == 0


def test_trainer_resamples_in_the_first_share_of_the_run():
    pdata = PlantedData("easy")
    batches = pdata.batches(512, 512 * 40)
    cfg = dict(arch="topk", k=5, d_in=64, n_latents=512)
    [t] = train_saes(batches, [cfg], TrainOptions(progress=False, total_steps=40, resample_every=5,
                                                  resample_until=0.5))
    assert t.metrics["resampled"] > 0
    [off] = train_saes(batches, [cfg], TrainOptions(progress=False, total_steps=40))
    assert off.metrics["resampled"] == 0
