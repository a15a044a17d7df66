"""Pursuit SAE: the k latents of a token are chosen in `rounds` greedy rounds against the residual.

A linear-plus-TopK encoder reads every latent off the raw input, so atoms that overlap
(a cluster of directions at cosine ~0.5) interfere: the cluster's mean direction scores
high for every member. Matching pursuit (Mallat & Zhang 1993; MP-SAE, Costa et al. 2025)
picks one latent, subtracts its decoder row times its code, and reads the next one off
what is left, so a latent already explained stops voting. Here each of `rounds` rounds picks
`k / rounds` new latents (the top of `relu(W_enc r + b_enc)` on the residual `r`, latents
already chosen excluded), with codes `relu(W_enc[j] . r + b_enc[j])`; `rounds = k` is
matching pursuit without re-selection, `rounds = 1` is TopK.

Weights and files are those of TopK (`W_enc`, `b_enc`, `W_dec`, `b_dec`; untied, so the
encoder can learn to undo what interference is left); only `encode` differs, and it costs
`rounds` encoder products instead of one. Training: the selection runs without gradient;
the codes and residuals are recomputed with gradient along the chosen latents only (gathers
of `[b, d]` rows per round), so the loss sees how each code depends on the rows subtracted before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safesail.errors import UserError
from safesail.saes.base import KParams, KSparseSAE, SAEConfig, TrainCodes
from safesail.saes.registry import register_arch


@dataclass
class PursuitParams(KParams):
    rounds: int | None = None   # greedy rounds (None: k, i.e. one latent per round)


@register_arch
class PursuitSAE(KSparseSAE):
    arch = "pursuit"
    Params = PursuitParams
    aux_on_residual = True

    @classmethod
    def folder_name(cls, cfg: SAEConfig) -> str:
        return f"{cls.arch}-k{cfg.k}-r{cfg.rounds}"

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        r = cfg.k if cfg.rounds is None else cfg.rounds
        try:
            r = int(r)
        except (TypeError, ValueError):
            raise UserError(f"pursuit needs rounds, an integer from 1 to k={cfg.k} (got {cfg.rounds!r}).") from None
        if not 1 <= r <= cfg.k:
            raise UserError(f"pursuit needs rounds from 1 to k={cfg.k} (got {r}); set rounds in the sweep config.")
        cfg.params["rounds"] = r

    def _schedule(self) -> list[int]:
        """Latents picked in each round (k split as evenly as it goes, larger rounds first)."""
        k, r = self.cfg.k, self.cfg.rounds
        return [k // r + (1 if i < k % r else 0) for i in range(r)]

    def _pursue(self, x_c: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values [b, k], indices [b, k], first-round pre-activations [b, n], detached) of `x_c = x - b_dec`."""
        b = x_c.shape[0]
        taken = torch.zeros(b, self.cfg.n_latents, dtype=torch.bool, device=x_c.device)
        r = x_c if grad else x_c.detach()
        vals, idxs, first = [], [], None
        for m in self._schedule():
            with torch.no_grad():
                pre = F.linear(r.detach(), self.W_enc, self.b_enc)
                if first is None:
                    first = pre
                pre = pre.masked_fill(taken, float("-inf"))
                j = pre.topk(m, dim=1, sorted=False).indices          # [b, m]
                taken.scatter_(1, j, True)
            w_e = self.W_enc[j]                                        # [b, m, d]
            v = (torch.einsum("bmd,bd->bm", w_e, r) + self.b_enc[j]).relu()
            r = r - torch.einsum("bm,bmd->bd", v, self.W_dec[j])
            vals.append(v)
            idxs.append(j)
        self._residual = r.detach() if grad else None
        return torch.cat(vals, 1), torch.cat(idxs, 1), first

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            v, j, _ = self._pursue(x.to(self.W_enc.dtype) - self.b_dec, grad=False)
        return v, j

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        v, j = self.encode_sparse(x)
        return torch.zeros(x.shape[0], self.cfg.n_latents, dtype=v.dtype, device=v.device).scatter_(1, j, v)

    def train_codes(self, x_c: torch.Tensor) -> TrainCodes:
        v, j, first = self._pursue(x_c, grad=True)
        return TrainCodes(pre=first, vals=v, idx=j)

    def _auxk(self, pre, e, dead_mask, total_var, x_c) -> torch.Tensor:
        """AuxK read off the pursuit's last residual, not the input: a dead latent is scored (and
        trained) on what the live ones left, the next round the pursuit would run."""
        r = getattr(self, "_residual", None)
        if r is None or not self.aux_on_residual or dead_mask is None or not bool(dead_mask.any()):
            return super()._auxk(pre, e, dead_mask, total_var, x_c)
        with torch.no_grad():
            pre_r = F.linear(r, self.W_enc, self.b_enc)
        return super()._auxk(pre_r, e, dead_mask, total_var, r)
