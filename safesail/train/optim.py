"""Optimisers for SAE training: `adam`, `signum` (schedule-free sign descent), and `auto` (one of them by run length).

- `adam`: torch's Adam; the trainer's schedule (warmup, constant, final decay) sets its lr.
- `signum`: the step is `-lr * sign(grad)` (steepest descent in the L-infinity norm, as
  sparsify's default), wrapped in schedule-free averaging (Defazio et al. 2024, momentum
  0.95): gradients are taken at `y = (1 - b) z + b x`, `z` takes the sign steps, and `x` is
  the running average of `z` (weights `lr^2`). Training weights are `y`, only `z` is stored; `eval_params()`
  swaps in `x`, the weights to save. It needs no decay schedule (warmup is still honoured).

- `auto`: `resolve_optimizer("auto", total_steps)` is signum below `AUTO_ADAM_STEPS` steps and Adam
  from there on (each with its own lr rule, `safesail.saes.config.default_lr`): signum wins the
  runs of 23 and 46 steps, Adam every run of >= 92 steps measured on real activations (layers 7
  and 14, k 32 and 128: docs/training.md, "The optimiser by run length"; the switch sits between); a run of unknown length gets signum (no decay schedule needed).
  The trainer resolves it before building the SAE, so cfg.json records the optimiser used.

`make_optimizer(name, params, lr, ...)` returns an object with `step()`, `zero_grad()`,
`param_groups`, `state_dict()` / `load_state_dict()` and `eval_params()` (a no-op for Adam).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch


class AdamOpt(torch.optim.Adam):
    @contextlib.contextmanager
    def eval_params(self) -> Iterator[None]:
        yield


class ScheduleFreeSignum(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_sum": 0.0})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Only z is stored; x is implied by the parameter y (x = (y - (1 - b) z) / b), so an in-place
        change of y (decoder renormalisation) carries over to the average, as in schedulefree's wrapper."""
        for group in self.param_groups:
            lr, b = group["lr"], group["momentum"]
            w = lr * lr
            group["weight_sum"] += w
            c = w / group["weight_sum"] if group["weight_sum"] > 0 else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "z" not in st:
                    st["z"] = p.detach().clone()
                z = st["z"]
                x = (p - (1 - b) * z) / b
                z.add_(p.grad.sign(), alpha=-lr)
                x.lerp_(z, c)
                p.copy_(torch.lerp(z, x, b))

    @contextlib.contextmanager
    def eval_params(self) -> Iterator[None]:
        """Swap the averaged weights x into the parameters (and back afterwards)."""
        saved = []
        with torch.no_grad():
            for group in self.param_groups:
                b = group["momentum"]
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and "z" in st:
                        saved.append((p, p.detach().clone()))
                        p.copy_((p - (1 - b) * st["z"]) / b)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in saved:
                    p.copy_(v)


AUTO_ADAM_STEPS = 64   # `auto`: Adam from this many steps on (signum won at 46 steps, Adam at 92: docs/training.md)


def resolve_optimizer(name: str, total_steps: int | None) -> str:
    """`auto` -> `signum` for runs shorter than AUTO_ADAM_STEPS steps (or of unknown length), else `adam`;
    any other name unchanged."""
    if name != "auto":
        return name
    return "adam" if total_steps and total_steps >= AUTO_ADAM_STEPS else "signum"


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    if name == "signum":
        return ScheduleFreeSignum(params, lr=lr)
    return AdamOpt(params, lr=lr, betas=tuple(betas), eps=eps)
