"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update).

`z = relu(pre)`; penalty `l1_coef * sum_j z_j * ||W_dec[j]||`. Decoder rows are free (not
held at unit norm): the norm-weighted penalty keeps the model from shrinking codes by
growing the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safesail.saes.base import SAE, TrainCodes


class ReLUSAE(SAE):
    arch = "relu"
    unit_norm_decoder = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_acts(x).relu()

    def train_codes(self, x_c: torch.Tensor) -> TrainCodes:
        z = F.linear(x_c, self.W_enc, self.b_enc).relu()
        penalty = self.cfg.l1_coef * (z * self.W_dec.norm(dim=1)).sum()
        return TrainCodes(pre=z.detach(), z=z, penalty=penalty)
