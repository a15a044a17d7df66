"""Matryoshka SAEs (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries in one SAE.

The latents are ordered; `prefixes` (fractions of the width, the last 1.0) mark nested
dictionaries `[0, m)`. Training adds, for every prefix, the FVU of the reconstruction that uses
only the latents inside it, so the first latents must explain the data on their own (general
features) and later ones refine them; this reduces feature absorption in wide SAEs.
Selection of the active latents is TopK per token (`matryoshka_topk`) or BatchTopK over the
batch (`matryoshka_batchtopk`); inference is that of TopK / BatchTopK, the files the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safesail.errors import UserError
from safesail.saes.archs.batchtopk import BatchTopKSAE
from safesail.saes.archs.topk import TopKSAE
from safesail.saes.base import KParams, TrainCodes
from safesail.saes.registry import register_arch
from safesail.saes.sparse_ops import sparse_decode


@dataclass
class MatryoshkaParams(KParams):
    prefixes: tuple[float, ...] = (0.0625, 0.25, 1.0)   # nested dictionary sizes, as fractions of n_latents


class _Matryoshka:
    """The nested-prefix loss and the check of `prefixes`; mixed into a TopK-style class."""

    Params = MatryoshkaParams

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)  # k
        try:
            fr = [float(f) for f in cfg.prefixes]
        except (TypeError, ValueError):
            raise UserError(f"{cls.arch} needs prefixes as a list of fractions ending in 1.0 (got "
                            f"{cfg.prefixes!r}).") from None
        if not fr or fr[-1] != 1.0 or any(not a < b for a, b in zip([0.0] + fr, fr)):
            raise UserError(f"{cls.arch} needs increasing prefixes in (0, 1] ending in 1.0 (got {fr}); "
                            "e.g. [0.0625, 0.25, 1.0].")
        sizes = [max(1, round(f * cfg.n_latents)) for f in fr]
        if len(set(sizes)) != len(sizes):
            raise UserError(f"{cls.arch}: prefixes {fr} give repeated sizes {sizes} at {cfg.n_latents} latents; "
                            "use fewer or wider prefixes.")
        cfg.params["prefixes"] = tuple(fr)

    def prefix_sizes(self) -> list[int]:
        return [max(1, round(f * self.cfg.n_latents)) for f in self.cfg.prefixes]

    def extra_loss(self, codes: TrainCodes, x: torch.Tensor, total_var: torch.Tensor) -> torch.Tensor:
        """Sum over the inner prefixes (the full one is the main FVU) of the prefix-only FVU."""
        loss = x.new_zeros((), dtype=torch.float32)
        for m in self.prefix_sizes()[:-1]:
            if codes.idx is not None:
                vals = codes.vals * (codes.idx < m)
                recon = sparse_decode(vals, codes.idx, self.W_dec, codes.pattern) + self.b_dec
            else:
                recon = codes.z[:, :m].to(self.W_dec.dtype) @ self.W_dec[:m] + self.b_dec
            loss = loss + (x.float() - recon.float()).pow(2).sum() / total_var
        return loss


@register_arch
class MatryoshkaTopKSAE(_Matryoshka, TopKSAE):
    arch = "matryoshka_topk"


@register_arch
class MatryoshkaBatchTopKSAE(_Matryoshka, BatchTopKSAE):
    arch = "matryoshka_batchtopk"
