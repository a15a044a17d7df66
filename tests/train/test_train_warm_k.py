"""TrainOptions.warm_k: a pursuit SAE trains with exactly warm_k latents a token first, then with its own k and stop."""

from __future__ import annotations

import pytest
import torch

from safesail.errors import UserError
from safesail.train.trainer import SAETrainState, TrainOptions, job_fingerprint, train_saes
from safesail.saes import SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(arch="pursuit", d_in=12, n_latents=24, k=6, stop=0.05, refit="ls", select="decoder", seed=0,
           optimizer="adam")


def _batches(n=8, rows=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(rows, 12, generator=g) for _ in range(n)]


def test_the_warm_phase_uses_warm_k_without_stop_then_the_configured_sparsity(monkeypatch):
    seen = []
    orig = SAETrainState._train_step

    def spy(self, *a):   # inside the step: the sparsity it trained with
        out = orig(self, *a)
        p = self.sae.cfg.params
        seen.append((p["k"], p["rounds"], p["stop"], out["l0"]))
        return out
    monkeypatch.setattr(SAETrainState, "_train_step", spy)
    [t] = train_saes(_batches(), [CFG], TrainOptions(progress=False, warm_k=3, warm_until=0.5))
    assert [s[:3] for s in seen] == [(3, 3, 0.0)] * 4 + [(6, 6, 0.05)] * 4
    assert all(s[3] == 3 for s in seen[:4])                 # exactly warm_k a token while warm
    assert t.sae.cfg.k == 6 and t.sae.cfg.stop == 0.05 and t.sae.cfg.rounds == 6


def test_a_run_that_ends_inside_the_warm_phase_exports_the_configured_sae():
    [t] = train_saes(_batches(4), [CFG], TrainOptions(progress=False, warm_k=2, warm_until=1.0))
    assert (t.sae.cfg.k, t.sae.cfg.rounds, t.sae.cfg.stop) == (6, 6, 0.05)


def test_warm_k_enters_the_fingerprint_only_when_on():
    cfgs = [SAEConfig.from_dict(dict(CFG)).validate()]
    base = job_fingerprint(cfgs, TrainOptions())
    assert job_fingerprint(cfgs, TrainOptions(warm_until=0.5)) == base     # off: the fraction does not count
    on = job_fingerprint(cfgs, TrainOptions(warm_k=3))
    assert on != base and on != job_fingerprint(cfgs, TrainOptions(warm_k=3, warm_until=0.5))


@pytest.mark.parametrize("cfg,opts", [({**CFG, "arch": "topk"}, dict(warm_k=3)), (CFG, dict(warm_k=7)),
                                      (CFG, dict(warm_k=3, warm_until=0.0)), (CFG, dict(warm_k=2.5))])
def test_bad_warm_k_is_one_clear_error(cfg, opts):
    cfg = {k: v for k, v in cfg.items() if cfg["arch"] == "pursuit" or k not in ("stop", "refit", "select")}
    with pytest.raises(UserError, match="warm_k"):
        train_saes(_batches(2), [cfg], TrainOptions(progress=False, **opts))


def test_between_steps_the_sae_keeps_its_own_name_and_config(monkeypatch):
    """The warm sparsity lives only inside a step: the folder name, the checkpoint key (hook/name) and the
    checkpointed cfg stay the configured SAE's, so a checkpoint written in the warm phase resumes, and two
    SAEs of one job with the same warm_k never share a key."""
    seen = []
    orig = SAETrainState.train_step

    def spy(self, *a):
        out = orig(self, *a)
        seen.append((self.cfg.name, self.state_dict()["cfg"]["k"], self.state_dict()["cfg"]["stop"]))
        return out
    monkeypatch.setattr(SAETrainState, "train_step", spy)
    cfgs = [CFG, {**CFG, "k": 8}]
    train_saes(_batches(4), cfgs, TrainOptions(progress=False, warm_k=3, warm_until=1.0))
    names = {SAEConfig.from_dict(dict(c)).validate().name for c in cfgs}
    assert {n for n, _, _ in seen} == names and len(names) == 2
    assert {(k, stop) for _, k, stop in seen} == {(6, 0.05), (8, 0.05)}
