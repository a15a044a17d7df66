"""The training recipe: schedule-free signum, AuxK in short runs, learned-nothing signals, threaded sweep, sweep keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safesail.errors import UserError
from safesail.saes import SAEConfig
from safesail.train.optim import ScheduleFreeSignum
from safesail.train.planted import PlantedData, mmcs
from safesail.train.signals import decoder_mmcs, warnings
from safesail.train.sweep import entry_config
from safesail.train.trainer import TrainOptions, auto_dead_tokens, train_saes

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_free_signum_steps_by_sign_and_averages():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ScheduleFreeSignum([p], lr=0.1, momentum=0.5)
    for _ in range(4):
        p.grad = torch.tensor([1.0, -2.0, 0.0])
        opt.step()
    z = opt.state[p]["z"]
    torch.testing.assert_close(z, torch.tensor([-0.4, 0.4, 0.0]))  # 4 sign steps of 0.1
    with opt.eval_params():  # x: the equal-weight average of z_1..z_4
        torch.testing.assert_close(p.detach(), torch.tensor([-0.25, 0.25, 0.0]))
    torch.testing.assert_close(p.detach(), 0.5 * z + 0.5 * torch.tensor([-0.25, 0.25, 0.0]))


def test_auxk_acts_in_a_short_run():
    assert auto_dead_tokens(None, 23, 4096) == 4 * 4096
    assert auto_dead_tokens(None, 10 ** 6, 4096) == 10_000_000
    assert auto_dead_tokens(500, 23, 4096) == 500
    pdata = PlantedData("easy")
    [t] = train_saes(pdata.batches(512, 512 * 40), [dict(arch="topk", k=5, d_in=64, n_latents=512)],
                     TrainOptions(progress=False))
    assert t.metrics["dead_tokens"] == 2048
    assert t.metrics["train_auxk"] > 0  # dead latents existed and AuxK trained them


def test_planted_dictionary_recovered_and_signals_quiet():
    pdata = PlantedData("easy")
    [t] = train_saes(pdata.batches(1024, 1024 * 80), [dict(arch="topk", k=5, d_in=64, n_latents=256)],
                     TrainOptions(progress=False))
    assert mmcs(t.sae.W_dec, pdata.atoms) > 0.85
    m = t.metrics
    assert m["decoder_init_cos"] < 0.6 and m["enc_dec_cos"] > 0.5 and len(m["train_fvu_curve"]) >= 10
    assert warnings(m) == []


def test_a_run_that_learned_nothing_is_flagged():
    pdata = PlantedData("easy")
    [t] = train_saes(pdata.batches(1024, 1024 * 20), [dict(arch="topk", k=5, d_in=64, n_latents=256, lr=1e-7)],
                     TrainOptions(progress=False))
    assert any("random start" in w for w in warnings(t.metrics))
    assert decoder_mmcs(t.sae.W_dec, t.sae.W_dec) == pytest.approx(1.0)


def test_threaded_sweep_gives_the_same_saes_and_a_profile():
    x = [torch.randn(256, 32) for _ in range(6)]
    cfgs = [dict(arch="topk", k=k, d_in=32, n_latents=128) for k in (4, 8, 16)]
    seq = train_saes(x, cfgs, TrainOptions(progress=False))
    par = train_saes(x, cfgs, TrainOptions(progress=False, sae_threads=3))
    for a, b in zip(seq, par):
        torch.testing.assert_close(a.sae.W_dec, b.sae.W_dec)
    prof = par[0].metrics["profile"]
    assert prof["sae_threads"] == 3 and prof["all_saes_wall_s"] > 0 and prof["this_sae_step_s"] > 0
    assert torch.get_num_threads() == 1  # restored


def test_sweep_entry_merges_defaults_and_refuses_unknown_keys():
    defaults = {"d_in": 8, "n_latents": 64, "optimizer": "adam", "lr": 1e-3}
    c = entry_config({"arch": "topk", "k": 4, "lr": 5e-4}, defaults)
    assert (c.optimizer, c.lr, c.k) == ("adam", 5e-4, 4)
    with pytest.raises(UserError, match=r"unknown key 'kk' for architecture topk; allowed keys: .*\bk\b"):
        entry_config({"arch": "topk", "kk": 4}, defaults)
    with pytest.raises(UserError, match="k='abc' is not|needs k, an integer"):
        entry_config({"arch": "topk", "k": "abc"}, defaults)
    with pytest.raises(UserError, match="optimizer 'sgd' is unknown"):
        SAEConfig(arch="topk", d_in=8, n_latents=64, k=4, optimizer="sgd").validate()


def test_gpu_suite_runs_on_cpu_small(tmp_path):
    out = tmp_path / "suite.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--small", "--out",
                    str(out)], check=True, cwd=REPO, capture_output=True, env={**__import__("os").environ,
                                                                                 "OMP_NUM_THREADS": "1"})
    import json

    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu") and r["small"] is True
    assert all(r["train"][f"k{k}"]["tokens_per_s"] > 0 for k in r["sizes"]["ks"])
    assert r["train"]["sweep"]["ratio"] > 0 and r["cache"]["ratio"] > 0
