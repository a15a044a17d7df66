"""TopK SAE (Gao et al. 2024; Safe-SAIL's released SAEs): keep the k largest ReLU pre-activations per token.

Training uses the sparse path of `sparse_ops`: the dense encoder product runs once without
grad, top-k picks the indices, and the backward touches only the k chosen latents per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safesail.saes.base import KSparseSAE, TrainCodes
from safesail.saes.registry import register_arch
from safesail.saes.sparse_ops import RowsPattern, gather_preacts


@register_arch
class TopKSAE(KSparseSAE):
    arch = "topk"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x).relu()
        top, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, top)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each [rows, k]: the sparse form of `encode`."""
        return self.pre_acts(x).relu().topk(self.cfg.k, dim=-1, sorted=False)

    def train_codes(self, x_c: torch.Tensor) -> TrainCodes:
        with torch.no_grad():
            pre = F.linear(x_c, self.W_enc, self.b_enc)
            top, idx = pre.topk(self.cfg.k, dim=1, sorted=False)
        pattern = RowsPattern(idx, self.cfg.n_latents)
        vals = gather_preacts(x_c.detach(), self.W_enc, self.b_enc, idx, top.clone(), b_dec=self.b_dec,
                              pattern=pattern).relu()
        return TrainCodes(pre=pre, vals=vals, idx=idx, pattern=pattern)
