"""dec_init: data — decoder rows from the first batch, the config field's old-file rule, drift signal, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from safesail.errors import UserError
from safesail.saes import SAEConfig, build_sae
from safesail.saes.base import initial_decoder
from safesail.train.data_init import data_initial_decoder, init_decoder_from_data
from safesail.train.planted import PlantedData, mmcs
from safesail.train.signals import warnings
from safesail.train.trainer import TrainOptions, train_saes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rows_come_from_the_batch_and_the_rest_stay_random():
    cfg = SAEConfig("topk", k=2, d_in=8, n_latents=12, dec_init="data").validate()
    sae = build_sae(cfg)
    x = torch.randn(5, 8) + 3.0
    sae.init_b_dec(x)
    assert init_decoder_from_data(sae, x, cfg.seed) == 5
    rows = F.normalize(x - x.mean(0), dim=1)
    cos = sae.W_dec[:5].detach() @ rows.T
    assert torch.allclose(cos.max(dim=1).values, torch.ones(5), atol=1e-5)   # each is one data row
    assert len(set(cos.argmax(dim=1).tolist())) == 5                         # distinct rows
    torch.testing.assert_close(sae.W_enc[:5].detach(), sae.W_dec[:5].detach() * cfg.enc_init_scale)
    torch.testing.assert_close(sae.W_dec[5:].detach(), initial_decoder(cfg)[5:])   # beyond the batch: random
    torch.testing.assert_close(data_initial_decoder(cfg, x), sae.W_dec.detach())


def test_config_default_old_files_and_bad_value():
    assert SAEConfig("topk", k=2, d_in=8, n_latents=16).dec_init == "random"
    old = {"arch": "topk", "k": 2, "d_in": 8, "n_latents": 16}          # a cfg.json from before the field
    assert SAEConfig.from_dict(old).dec_init == "random"
    rnd = SAEConfig("topk", k=2, d_in=8, n_latents=16, dec_init="random")
    assert "dec_init" not in rnd.to_dict()                              # old fingerprints unchanged
    assert SAEConfig.from_dict(rnd.to_dict()) == rnd
    data = SAEConfig("topk", k=2, d_in=8, n_latents=16, dec_init="data")
    assert SAEConfig.from_dict(data.to_dict()).dec_init == "data"
    with pytest.raises(UserError, match="dec_init 'kmeans' is unknown"):
        SAEConfig("topk", k=2, d_in=8, n_latents=16, dec_init="kmeans").validate()


def test_data_init_recovers_more_atoms_and_drift_is_measured_from_its_start():
    pdata = PlantedData("easy")
    batches = pdata.batches(1024, 1024 * 80)
    got = {}
    for init in ("random", "data"):
        [t] = train_saes(batches, [dict(arch="topk", k=5, d_in=64, n_latents=256, dec_init=init)],
                         TrainOptions(progress=False))
        got[init] = mmcs(t.sae.W_dec, pdata.atoms)
        assert t.metrics["decoder_init_cos"] < 0.6 and warnings(t.metrics) == []
    assert got["data"] > got["random"] + 0.005
    # a run that does not move is flagged against the data start, not the random one
    [t] = train_saes(batches[:10], [dict(arch="topk", k=5, d_in=64, n_latents=256, lr=1e-7, dec_init="data")],
                     TrainOptions(progress=False))
    assert t.metrics["decoder_init_cos"] > 0.99
    assert any("random start" in w for w in warnings(t.metrics))


class Killed(Exception):
    pass


def test_resume_keeps_the_data_start(tmp_path):
    x = [torch.randn(64, 16) + 1.0 for _ in range(8)]
    cfg = [dict(arch="topk", k=4, d_in=16, n_latents=48, dec_init="data")]
    opts = TrainOptions(progress=False, total_steps=8, checkpoint_path=tmp_path / "ck.pt", checkpoint_every=3)
    full = train_saes(x, cfg, TrainOptions(progress=False, total_steps=8))[0]

    def dying(start):
        for i, b in enumerate(x[start:], start):
            if i == 5:
                raise Killed
            yield b

    with pytest.raises(Killed):
        train_saes(dying, cfg, opts)
    resumed = train_saes(lambda start: x[start:], cfg, opts)[0]   # continues after batch 3, no first batch seen
    torch.testing.assert_close(resumed.sae.W_dec, full.sae.W_dec, rtol=0, atol=0)
    assert resumed.metrics["decoder_init_cos"] == pytest.approx(full.metrics["decoder_init_cos"])
