"""JumpReLU SAE (Rajamanoharan et al. 2024; carried by Safe-SAIL's code as `encoder.theta`).

`z = pre * [pre > theta]` with a learned per-latent threshold theta. The step function has
no useful gradient, so theta learns through straight-through estimators with a rectangular
kernel of width `bandwidth`; the sparsity penalty is `l0_coef * L0`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from safesail.saes.base import SAE, TrainCodes


def _kernel(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad * (pre > theta)
        grad_theta = (-(theta / bw) * _kernel((pre - theta) / bw) * grad).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_theta = (-(1.0 / bw) * _kernel((pre - theta) / bw) * grad).sum(0)
        return torch.zeros_like(pre), grad_theta, None


class JumpReLUSAE(SAE):
    arch = "jumprelu"

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device, dtype)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.n_latents,), math.log(cfg.init_threshold), device=device, dtype=dtype))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def train_codes(self, x_c: torch.Tensor) -> TrainCodes:
        pre = F.linear(x_c, self.W_enc, self.b_enc)
        theta = self.threshold.to(pre.dtype)
        z = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        l0 = _Step.apply(pre, theta, self.cfg.bandwidth).sum()
        return TrainCodes(pre=pre.detach(), z=z, penalty=self.cfg.l0_coef * l0)

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        super().fold_input_scale(s)
        self.log_threshold -= math.log(s)
