"""BatchTopK SAE (Bussmann et al. 2024): keep the k * batch largest activations over the whole batch.

Tokens get a varying number of latents (k on average). For inference, where there is no
batch, a single threshold is learned during training as a running average of the smallest
kept activation; `encode` keeps activations above it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safesail.saes.base import KSparseSAE, TrainCodes
from safesail.saes.registry import register_arch


@register_arch
class BatchTopKSAE(KSparseSAE):
    arch = "batchtopk"
    threshold_momentum = 0.9   # EMA of the smallest kept activation (about the last 10 batches)

    def __init__(self, cfg, device=None, dtype=torch.float32):
        super().__init__(cfg, device, dtype)
        self.register_buffer("threshold", torch.tensor(-1.0, device=device, dtype=dtype))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x).relu()
        return pre * (pre > self.threshold.clamp_min(0))

    def train_codes(self, x_c: torch.Tensor) -> TrainCodes:
        pre = F.linear(x_c, self.W_enc, self.b_enc).relu()
        flat = pre.reshape(-1)
        kk = min(self.cfg.k * pre.shape[0], flat.numel())
        with torch.no_grad():
            top, fidx = flat.topk(kk, sorted=False)
            positive = top[top > 0]
            if positive.numel():
                low = positive.min()
                if self.threshold < 0:
                    self.threshold.fill_(low)
                else:
                    self.threshold.mul_(self.threshold_momentum).add_((1 - self.threshold_momentum) * low)
        z = torch.zeros_like(flat).scatter(0, fidx, flat.gather(0, fidx)).view_as(pre)
        return TrainCodes(pre=pre.detach(), z=z)

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        super().fold_input_scale(s)
        if self.threshold >= 0:
            self.threshold /= s
