"""JumpReLU SAE (Rajamanoharan et al. 2024; carried by Safe-SAIL's code as `encoder.theta`).

`z = pre * [pre > theta]` with a learned per-latent threshold theta. The step function has
no useful gradient, so theta learns through straight-through estimators with a rectangular
kernel of width `bandwidth`; the sparsity penalty is `l0_coef * L0`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from safesail.errors import UserError
from safesail.saes.base import SAE, TrainCodes
from safesail.saes.registry import register_arch


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


@dataclass
class JumpReLUParams:
    l0_coef: float = 0.001          # weight of the L0 penalty
    bandwidth: float = 0.001        # width of the straight-through kernel (normalised units)
    init_threshold: float = 0.001   # initial threshold (normalised units)


@register_arch
class JumpReLUSAE(SAE):
    arch = "jumprelu"
    Params = JumpReLUParams

    @classmethod
    def folder_name(cls, cfg) -> str:
        return f"jumprelu-l0_{float(cfg.l0_coef):g}"

    @classmethod
    def check_config(cls, cfg) -> None:
        p = cfg.params
        for key, default in (("l0_coef", 0.001), ("bandwidth", 0.001), ("init_threshold", 0.001)):
            p[key] = float(p[key] if p[key] is not None else default)
        if p["l0_coef"] < 0 or p["bandwidth"] <= 0 or p["init_threshold"] <= 0:
            raise UserError(f"jumprelu needs l0_coef >= 0, bandwidth > 0 and init_threshold > 0 (got "
                            f"{p['l0_coef']}, {p['bandwidth']}, {p['init_threshold']}).")

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

    @torch.no_grad()
    def scale_thresholds(self, factor: torch.Tensor) -> None:
        self.log_threshold += factor.log().to(self.log_threshold.dtype)
