"""train_saes: dictionary recovery, one-pass sweeps, exact resume, distributed, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safesail.errors import UserError
from safesail.train.trainer import TrainOptions, train_saes

HERE = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(n_rows, dictionary, k, seed):
    """Rows made of exactly k atoms of a known dictionary with positive weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_rows, dictionary.shape[0], generator=g).topk(k, dim=1).indices
    vals = torch.rand(n_rows, k, generator=g) + 0.5
    return torch.zeros(n_rows, dictionary.shape[0]).scatter(1, idx, vals) @ dictionary


def fvu(sae, x):
    with torch.no_grad():
        return float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_topk_recovers_a_known_dictionary():
    g = torch.Generator().manual_seed(0)
    d, n, k = 32, 64, 3
    D = torch.randn(n, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    data = synthetic(250 * 256, D, k, seed=1) * 5.0 + 1.0  # raw units; normalised inside, folded back at the end
    [t] = train_saes(list(data.split(256)), [dict(arch="topk", k=k, n_latents=n, d_in=d, lr=1e-2)],
                     TrainOptions(lr_warmup_steps=10, progress=False))
    W = t.sae.W_dec.detach()
    W = W / W.norm(dim=1, keepdim=True)
    mean_max_cos = float((D @ W.T).max(1).values.mean())
    assert mean_max_cos >= 0.9
    held_out = synthetic(2048, D, k, seed=2) * 5.0 + 1.0
    assert fvu(t.sae, held_out) < 0.1
    assert t.metrics["tokens_trained"] == 250 * 256 and t.metrics["train_l0"] == pytest.approx(k)
    assert t.sae.cfg.input_scale > 0


def batches(n=10, b=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g) * 2 + 0.5 for _ in range(n)]


CONFIGS = [dict(arch="topk", k=4, d_in=16, n_latents=64, seed=1, lr=2e-3),
           dict(arch="batchtopk", k=4, d_in=16, n_latents=64, seed=2, lr=2e-3),
           dict(arch="jumprelu", l0_coef=0.001, d_in=16, n_latents=48, seed=3, lr=2e-3)]


def test_one_pass_sweep_equals_separate_runs():
    opts = TrainOptions(lr_warmup_steps=3, dead_tokens=128, progress=False)
    together = train_saes(batches(), CONFIGS, opts)
    for cfg, t in zip(CONFIGS, together):
        [alone] = train_saes(batches(), [cfg], opts)
        for key, v in t.sae.state_dict().items():
            torch.testing.assert_close(v, alone.sae.state_dict()[key], rtol=0, atol=0, msg=f"{t.name}.{key}")


class Killed(Exception):
    pass


def test_resume_after_kill_is_exact(tmp_path):
    ck = tmp_path / "job.pt"
    opts = TrainOptions(lr_warmup_steps=3, dead_tokens=128, progress=False, total_steps=10,
                        checkpoint_path=ck, checkpoint_every=3)
    reference = train_saes(batches(), CONFIGS[:2], TrainOptions(lr_warmup_steps=3, dead_tokens=128,
                                                                progress=False, total_steps=10))
    served = []

    def dying(start):
        for i, b in enumerate(batches()[start:], start):
            if i == 7:
                raise Killed  # the process dies while reading batch 7; the last checkpoint is after batch 6
            served.append(i)
            yield b

    with pytest.raises(Killed):
        train_saes(dying, CONFIGS[:2], opts)
    assert ck.exists() and torch.load(ck, weights_only=False)["batches_done"] == 6

    def rest(start):
        served.append(("resume", start))
        return batches()[start:]

    resumed = train_saes(rest, CONFIGS[:2], opts)
    assert ("resume", 6) in served  # the data position came from the checkpoint
    for a, b in zip(reference, resumed):
        for key, v in a.sae.state_dict().items():
            torch.testing.assert_close(v, b.sae.state_dict()[key], rtol=0, atol=0, msg=f"{a.name}.{key}")
    # a changed config must not silently continue that checkpoint
    with pytest.raises(UserError, match="another config"):
        train_saes(rest, [dict(CONFIGS[0], lr=1e-3)], opts)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import _train_ddp_worker as worker
    finally:
        sys.path.remove(str(HERE))
    single = train_saes(worker.global_batches(), worker.CONFIGS, TrainOptions(**worker.OPTS))
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HERE / "_train_ddp_worker.py"), str(out)],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    for t in single:
        for key, v in t.sae.state_dict().items():
            torch.testing.assert_close(ddp[t.name][key], v, rtol=1e-4, atol=1e-5, msg=f"{t.name}.{key}")


def test_sae_parallel_mode_splits_the_sweep():
    from safesail.train.distributed import DistContext

    ctx = DistContext(rank=1, world_size=2, mode="sae_parallel")  # no process group needed: no collectives
    got = train_saes(batches(3), CONFIGS, TrainOptions(progress=False), ctx=ctx)
    assert [t.name for t in got] == ["batchtopk-k4"]


def test_hook_dict_batches_route_each_sae():
    data = [{"a": x, "b": x[:, :8] * 10} for x in batches(4)]
    got = train_saes(data, [dict(arch="topk", k=2, d_in=16, n_latents=32, hook="a"),
                            dict(arch="topk", k=2, d_in=8, n_latents=32, hook="b")], TrainOptions(progress=False))
    assert [t.cfg.d_in for t in got] == [16, 8]


def test_bad_input():
    good = dict(arch="topk", k=4, d_in=16, n_latents=64)
    bad = batches(3)
    bad[1][5, 7] = float("nan")
    with pytest.raises(UserError, match=r"NaN/inf \(batch 1, row 5, column 7\)"):
        train_saes(bad, [good], TrainOptions(progress=False))
    with pytest.raises(UserError, match="12 wide but the SAE config says d_in=16"):
        train_saes([torch.randn(8, 12)], [good], TrainOptions(progress=False))
    with pytest.raises(UserError, match="no activation batches"):
        train_saes([], [good], TrainOptions(progress=False))
    with pytest.raises(UserError, match="larger than the SAE width"):
        train_saes(batches(1), [dict(good, k=65)], TrainOptions(progress=False))
    with pytest.raises(UserError, match="twice"):
        train_saes(batches(1), [good, good], TrainOptions(progress=False))
