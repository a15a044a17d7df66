"""optimizer: auto picks schedule-free signum for short runs and Adam (with its own lr rule) for long ones."""

from __future__ import annotations

import pytest
import torch

from safesail.errors import UserError
from safesail.saes import SAEConfig
from safesail.saes.config import default_lr
from safesail.train.optim import AUTO_ADAM_STEPS, resolve_optimizer
from safesail.train.trainer import TrainOptions, train_saes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resolve_by_step_count():
    assert resolve_optimizer("auto", AUTO_ADAM_STEPS - 1) == "signum"
    assert resolve_optimizer("auto", AUTO_ADAM_STEPS) == "adam"
    assert resolve_optimizer("auto", None) == "signum"        # unknown length: no schedule needed
    assert resolve_optimizer("adam", 1) == "adam" and resolve_optimizer("signum", 10 ** 6) == "signum"
    assert SAEConfig(arch="topk", d_in=4, n_latents=16, k=2, optimizer="auto").validate().optimizer == "auto"
    with pytest.raises(UserError, match="optimizer 'sgd' is unknown"):
        SAEConfig(arch="topk", d_in=4, n_latents=16, k=2, optimizer="sgd").validate()


@pytest.mark.parametrize("steps,want", [(AUTO_ADAM_STEPS - 1, "signum"), (AUTO_ADAM_STEPS, "adam")])
def test_train_saes_resolves_auto_and_records_it(steps, want):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 8, generator=g) for _ in range(steps)]
    [t] = train_saes(batches, [dict(arch="topk", d_in=8, n_latents=32, k=2, optimizer="auto")],
                     TrainOptions(progress=False, lr_warmup_steps=2))
    assert t.cfg.optimizer == want and t.metrics["optimizer"] == want
    assert t.metrics["lr"] == pytest.approx(default_lr(32, want))   # each optimiser's own lr rule
    assert t.cfg.extra["optimizer_rule"] == f"auto ({steps} steps)"
    assert SAEConfig.from_dict(t.cfg.to_dict()).optimizer == want  # cfg.json says what was used
