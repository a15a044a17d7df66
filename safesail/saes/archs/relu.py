"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update).

`z = relu(pre)`; penalty `l1_coef * sum_j z_j * ||W_dec[j]||`. Decoder rows are free (not
held at unit norm): the norm-weighted penalty keeps the model from shrinking codes by
growing the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safesail.errors import UserError
from safesail.saes.base import SAE, TrainCodes
from safesail.saes.registry import register_arch


@dataclass
class ReLUParams:
    l1_coef: float = 0.05     # weight of the decoder-norm-weighted L1 penalty


@register_arch
class ReLUSAE(SAE):
    arch = "relu"
    Params = ReLUParams
    unit_norm_decoder = False

    @classmethod
    def folder_name(cls, cfg) -> str:
        return f"relu-l1_{float(cfg.l1_coef):g}"

    @classmethod
    def check_config(cls, cfg) -> None:
        cfg.params["l1_coef"] = float(cfg.l1_coef if cfg.l1_coef is not None else 0.05)
        if cfg.l1_coef < 0:
            raise UserError(f"relu needs l1_coef >= 0 (got {cfg.l1_coef}).")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_acts(x).relu()

    def train_codes(self, x_c: torch.Tensor) -> TrainCodes:
        z = F.linear(x_c, self.W_enc, self.b_enc).relu()
        penalty = self.cfg.l1_coef * (z * self.W_dec.norm(dim=1)).sum()
        return TrainCodes(pre=z.detach(), z=z, penalty=penalty)
