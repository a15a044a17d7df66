"""The memory formula of safesail/train/memory.py holds part by part on a small config; eval is chunked."""

from __future__ import annotations

import contextlib

import pytest
import torch

from safesail.saes import SAEConfig, build_sae
from safesail.train.distributed import DistContext
from safesail.train.evaluate import evaluate_reconstruction
from safesail.train.memory import held_bytes, param_count, resident_bytes, train_peak_bytes
from safesail.train.trainer import SAETrainState, TrainOptions, train_saes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_state_holds_what_the_formula_says_and_no_gradients_between_steps(optimizer):
    n, d = 96, 12
    cfg = SAEConfig(arch="topk", k=4, d_in=d, n_latents=n, optimizer=optimizer).validate()
    st = SAETrainState(cfg, TrainOptions(progress=False, total_steps=4), torch.device("cpu"))
    ctx = DistContext(device=torch.device("cpu"))
    x = torch.randn(64, d)
    for _ in range(2):
        st.train_step(x, ((x - x.mean(0)).pow(2).sum(), 64), ctx, contextlib.nullcontext)
    held = held_bytes(st.sae, st.opt)
    want = resident_bytes(n, d, optimizer)
    assert param_count(n, d) == sum(p.numel() for p in st.sae.parameters())
    assert held["weights"] == want["weights"] and held["optimizer"] == want["optimizer"]
    assert held["gradients"] == 0   # set to None after each step: only the SAE stepping holds gradients
    assert train_peak_bytes(n, d, 3, 64, 4, optimizer) > 3 * sum(want.values())


def test_export_releases_the_training_state():
    x = [torch.randn(64, 12) for _ in range(3)]
    cfgs = [dict(arch="topk", k=k, d_in=12, n_latents=96) for k in (2, 4)]
    out = train_saes(x, cfgs, TrainOptions(progress=False))
    assert [t.sae.cfg.k for t in out] == [2, 4] and all(not t.sae.training for t in out)
    st = SAETrainState(SAEConfig.from_dict(cfgs[0]).validate(), TrainOptions(progress=False), torch.device("cpu"))
    trained = st.export(1.0, release=True)
    assert st.sae is None and st.opt is None and trained.sae.W_dec.shape == (96, 12)


@torch.no_grad()
def _dense_eval(sae, x):
    z = sae.encode(x)
    r = sae.decode(z)
    fvu = float((x - r).double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    return fvu, float((z > 0).sum() / x.shape[0]), float(((z > 0).sum(0) == 0).float().mean())


@pytest.mark.parametrize("arch", ["topk", "relu", "batchtopk"])
def test_chunked_eval_equals_one_dense_pass(monkeypatch, arch):
    import safesail.train.evaluate as ev

    monkeypatch.setattr(ev, "EVAL_ROWS", 37)   # several chunks per batch, a ragged last one
    torch.manual_seed(0)
    extra = {"k": 5} if arch != "relu" else {}
    sae = build_sae({"arch": arch, "d_in": 10, "n_latents": 80, **extra})
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)
    x = torch.randn(300, 10)
    [got] = evaluate_reconstruction([sae], x.split(128))
    fvu, l0, dead = _dense_eval(sae, x)
    assert got["eval_tokens"] == 300
    assert got["fvu"] == pytest.approx(fvu, rel=1e-5) and got["l0"] == pytest.approx(l0)
    assert got["dead_fraction"] == pytest.approx(dead)
