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

Options (session 5, docs/training.md): `refit: ls` re-solves the codes of all latents chosen so
far by least squares on their decoder rows after every round (orthogonal matching pursuit; the
next round reads the residual orthogonal to them, codes clamped at 0), `select: decoder` picks
each round's latents by `W_dec r` (tied selection, as OMP; the encoder then only trains through
AuxK), `refine: N` runs N projected-gradient (ISTA) steps on the chosen codes after the last
round. Gradients flow through the solves and the steps. `stop: s` (session 6) lets a token take
fewer than k latents: once its residual's squared norm is at most `s` times that of `x - b_dec`, the
later rounds' picks get code 0 (with `refit: ls` their decoder rows leave the solve). With exactly k
a token, rows holding more features than k pull the decoder off them (planted `hard`); the planted
recipe trains with exactly k first and with the stop after (TrainOptions.warm_k, docs/training.md).
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
    refit: str = "none"         # none | ls: least-squares codes of all chosen latents after every round (OMP)
    select: str = "encoder"     # encoder: a round's latents are the top of W_enc r + b_enc | decoder: of W_dec r
    refine: int = 0             # projected-gradient steps on the chosen codes after the last round
    stop: float = 0.0           # a token takes no more latents once its residual's squared norm is at most this
                                # share of its own (k is then the most it takes; 0: always k)


REFITS, SELECTS = ("none", "ls"), ("encoder", "decoder")


@register_arch
class PursuitSAE(KSparseSAE):
    arch = "pursuit"
    Params = PursuitParams
    aux_on_residual = True

    @classmethod
    def folder_name(cls, cfg: SAEConfig) -> str:
        name = f"{cls.arch}-k{cfg.k}-r{cfg.rounds}"
        if cfg.refit != "none":
            name += f"-{cfg.refit}"
        if cfg.select != "encoder":
            name += f"-sel{cfg.select}"
        name += f"-i{cfg.refine}" if cfg.refine else ""
        return name + (f"-stop{cfg.stop:g}" if cfg.stop else "")

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
        if cfg.refit not in REFITS:
            raise UserError(f"pursuit refit {cfg.refit!r} is unknown; use {' or '.join(REFITS)}.")
        if cfg.select not in SELECTS:
            raise UserError(f"pursuit select {cfg.select!r} is unknown; use {' or '.join(SELECTS)}.")
        try:
            refine = int(cfg.refine)
        except (TypeError, ValueError):
            refine = -1
        if refine < 0:
            raise UserError(f"pursuit refine must be an integer >= 0 (got {cfg.refine!r}).")
        cfg.params["refine"] = refine
        try:
            stop = float(cfg.stop)
        except (TypeError, ValueError):
            stop = -1.0
        if not 0.0 <= stop < 1.0:
            raise UserError(f"pursuit stop must be a number from 0 to below 1 (got {cfg.stop!r}).")
        cfg.params["stop"] = stop

    def _schedule(self) -> list[int]:
        """Latents picked in each round (k split as evenly as it goes, larger rounds first)."""
        k, r = self.cfg.k, self.cfg.rounds
        return [k // r + (1 if i < k % r else 0) for i in range(r)]

    def _select_pre(self, r: torch.Tensor) -> torch.Tensor:
        if self.cfg.select == "decoder":
            return F.linear(r, self.W_dec)
        return F.linear(r, self.W_enc, self.b_enc)

    def _pursue(self, x_c: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values [b, k], indices [b, k], first-round pre-activations [b, n], detached) of `x_c = x - b_dec`."""
        b = x_c.shape[0]
        taken = torch.zeros(b, self.cfg.n_latents, dtype=torch.bool, device=x_c.device)
        x0 = x_c if grad else x_c.detach()
        r = x0
        stop = float(self.cfg.stop)
        if stop:
            alive = torch.ones(b, dtype=torch.bool, device=x_c.device)
            floor = stop * x0.detach().float().pow(2).sum(1)
        vals, idxs, keeps, first = [], [], [], None
        for m in self._schedule():
            with torch.no_grad():
                pre = self._select_pre(r.detach())
                if first is None:
                    first = pre if self.cfg.select == "encoder" else F.linear(r.detach(), self.W_enc, self.b_enc)
                pre = pre.masked_fill(taken, float("-inf"))
                j = pre.topk(m, dim=1, sorted=False).indices          # [b, m]
                taken.scatter_(1, j, True)
            keep = alive[:, None].expand(-1, m) if stop else None   # tokens still taking latents
            if self.cfg.refit == "ls":
                j = torch.cat(idxs + [j], 1)
                d_rows = self.W_dec[j]                                  # [b, m_all, d]
                if stop:
                    keep = torch.cat(keeps + [keep], 1)
                    d_rows = d_rows * keep[..., None].to(d_rows.dtype)   # a skipped pick: a zero row, code 0
                v = _least_squares(d_rows, x0)
                r = x0 - torch.einsum("bm,bmd->bd", v, d_rows)
                vals, idxs, keeps = [v], [j], [keep] if stop else []
            else:
                w_e = self.W_enc[j]                                        # [b, m, d]
                v = (torch.einsum("bmd,bd->bm", w_e, r) + self.b_enc[j]).relu()
                if stop:
                    v = v * keep.to(v.dtype)
                    keeps.append(keep)
                r = r - torch.einsum("bm,bmd->bd", v, self.W_dec[j])
                vals.append(v)
                idxs.append(j)
            if stop:
                alive = alive & (r.detach().float().pow(2).sum(1) > floor)
        v, j = torch.cat(vals, 1), torch.cat(idxs, 1)
        if self.cfg.refine:
            d_rows = self.W_dec[j]
            if stop:
                d_rows = d_rows * torch.cat(keeps, 1)[..., None].to(d_rows.dtype)
            v = _projected_gradient(v, d_rows, x0, int(self.cfg.refine))
            r = x0 - torch.einsum("bm,bmd->bd", v, d_rows)
        self._residual = r.detach() if grad else None
        return v, j, first

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


def _least_squares(d_rows: torch.Tensor, x: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Codes [b, m] minimising |x - v D|^2 over the rows D [b, m, d] of each token (a small ridge keeps
    repeated rows solvable), clamped at 0; float32 whatever the autocast."""
    dt = d_rows.dtype
    wide = torch.promote_types(dt, torch.float32)
    d32, x32 = d_rows.to(wide), x.to(wide)
    g = torch.einsum("bmd,bnd->bmn", d32, d32)
    g = g + ridge * torch.eye(g.shape[-1], device=g.device, dtype=g.dtype)
    c = torch.einsum("bmd,bd->bm", d32, x32)
    return torch.linalg.solve(g, c).relu().to(dt)


def _projected_gradient(v: torch.Tensor, d_rows: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` of v <- relu(v + (c - G v) / L) on |x - v D|^2 (G = D D^T, c = D x, L >= G's largest
    eigenvalue by Gershgorin): codes moved toward the non-negative least squares on their support."""
    g = torch.einsum("bmd,bnd->bmn", d_rows, d_rows)
    c = torch.einsum("bmd,bd->bm", d_rows, x.to(d_rows.dtype))
    step = 1.0 / g.abs().sum(-1).amax(-1, keepdim=True).clamp_min(1e-6)
    for _ in range(steps):
        v = (v + step * (c - torch.einsum("bmn,bn->bm", g, v))).relu()
    return v
