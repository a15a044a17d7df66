"""The interface every SAE architecture shares (one subclass per file: topk.py, batchtopk.py, ...).

Weights: `W_enc [n, d]`, `b_enc [n]`, `W_dec [n, d]` (rows are the latent directions), `b_dec [d]`
(the tied pre-encoder / post-decoder bias: encoding reads `x - b_dec`).

- `encode(x) -> [rows, n]`: dense, non-negative codes (inference).
- `decode(z) -> [rows, d]`; `forward(x)`: the reconstruction `decode(encode(x))`.
- `forward_with_loss(x, dead_mask=...)`: the training pass, an `SAEOutput` with the loss
  (FVU + sparsity penalty + AuxK), FVU, L0 and which latents fired.

During training the trainer feeds activations multiplied by a scale `s` (unit mean squared
norm); `fold_input_scale(s)` rewrites the weights so the saved SAE takes raw activations and
returns codes in the raw scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from safesail.errors import UserError
from safesail.saes.config import SAEConfig
from safesail.saes.sparse_ops import choose_decoder, dense_columns_codes, gather_preacts, sparse_decode

# AuxK over the dead columns as dense products (`[b, dead] @ [dead, d]`) while there are at most
# this many dead latents per AuxK slot (k_aux; crossover ~7x on CPU), else as sparse gathers of k_aux rows per token
# (measured on CPU: benchmarks/bench_train_step.py, docs/training.md)
AUXK_DENSE_RATIO = 6.0


class TrainCodes(NamedTuple):
    """Codes of a training batch: sparse (`vals`, `idx` [b, k]) or dense (`z` [b, n])."""
    pre: torch.Tensor                   # [b, n] pre-activations, detached (AuxK, statistics)
    vals: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    z: torch.Tensor | None = None
    penalty: torch.Tensor | None = None  # sparsity penalty summed over the batch
    pattern: Any = None                 # sparse_ops.RowsPattern of idx, shared by the encoder and decoder backward


class SAEOutput(NamedTuple):
    recon: torch.Tensor
    loss: torch.Tensor
    fvu: torch.Tensor
    aux_loss: torch.Tensor
    sparsity_loss: torch.Tensor
    l0: torch.Tensor          # mean active latents per token
    fired: torch.Tensor       # [n] bool: latents active at least once in the batch


@dataclass
class NoParams:
    """An architecture without settings of its own."""


class SAE(nn.Module):
    """Subclass per architecture: set `arch`, `Params` (its own config fields with defaults), and
    override `folder_name` / `check_config` when its settings need them; decorate with
    `safesail.saes.registry.register_arch`."""

    arch: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    unit_norm_decoder = True

    @classmethod
    def folder_name(cls, cfg: SAEConfig) -> str:
        return cls.arch

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise UserError (one sentence) for a bad setting; may normalise types (e.g. int(k))."""

    def __init__(self, cfg: SAEConfig, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg.validate()
        n, d = cfg.n_latents, cfg.d_in
        w = initial_decoder(cfg)
        enc_scale = float(cfg.enc_init_scale) if cfg.enc_init == "decoder_scaled" else 1.0
        self.W_enc = nn.Parameter((w * enc_scale).to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(w.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.decoder_impl = "auto"   # topk: auto | sparse | dense (see sparse_ops.choose_decoder)

    # ---- inference -----------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.W_enc.dtype) - self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ---- training ------------------------------------------------------------
    def train_codes(self, x_c: torch.Tensor) -> TrainCodes:  # pragma: no cover - abstract
        """Codes of `x_c = x - self.b_dec` (its gradient reaches b_dec; sparse paths route it there directly)."""
        raise NotImplementedError

    def forward_with_loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
                          total_var: torch.Tensor | None = None, n_tokens: int | None = None) -> SAEOutput:
        """The training pass on `x` (already normalised).

        `total_var` (sum of squared deviations from the batch mean) and `n_tokens` default to
        this batch's; data-parallel training passes the global ones so that summing gradients
        over ranks gives exactly the single-process gradient.
        """
        b = x.shape[0]
        x_c = x - self.b_dec
        codes = self.train_codes(x_c)
        if codes.idx is not None:
            decode = choose_decoder(self.decoder_impl, codes.idx.shape[1], x.device)
            recon = decode(codes.vals, codes.idx, self.W_dec, codes.pattern) + self.b_dec
            active = codes.vals > 0
            fired = torch.zeros(self.cfg.n_latents, dtype=torch.bool, device=x.device)
            fired[codes.idx[active]] = True
        else:
            recon = codes.z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
            active = codes.z > 0
            fired = active.any(0)
        if total_var is None:
            total_var = (x - x.mean(0)).float().pow(2).sum()
        n_tokens = n_tokens or b
        e = x.float() - recon.float()
        fvu = e.pow(2).sum() / total_var
        sparsity = codes.penalty / n_tokens if codes.penalty is not None else fvu.new_zeros(())
        aux = self._auxk(codes.pre, e, dead_mask, total_var, x_c)
        loss = fvu + sparsity + self.cfg.auxk_alpha * aux
        extra = self.extra_loss(codes, x, total_var)
        if extra is not None:
            loss = loss + extra
        return SAEOutput(recon, loss, fvu, aux, sparsity, active.sum() / b, fired)

    def extra_loss(self, codes: TrainCodes, x: torch.Tensor, total_var: torch.Tensor) -> torch.Tensor | None:
        """An architecture's own loss term beside FVU, sparsity and AuxK (None: none)."""
        return None

    def _auxk(self, pre, e, dead_mask, total_var, x_c) -> torch.Tensor:
        """AuxK (Gao et al.): the top dead latents must predict the residual of the live ones.

        The top-k runs over the dead columns only; with few dead latents (at most
        AUXK_DENSE_RATIO x k_aux) their codes and gradients are dense products over those
        columns, else sparse gathers of k_aux rows per token (the same loss and gradients: test)."""
        if dead_mask is None or self.cfg.auxk_alpha <= 0:
            return e.new_zeros(())
        num_dead = int(dead_mask.sum())
        if num_dead == 0:
            return e.new_zeros(())
        k_aux = self.cfg.k_aux or self.cfg.d_in // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        dead_idx = dead_mask.nonzero().flatten()
        cols = pre.index_select(1, dead_idx)
        x_c = x_c.detach()
        if num_dead <= AUXK_DENSE_RATIO * k_aux:
            with torch.no_grad():
                if k_aux < num_dead and 2 * k_aux <= num_dead:
                    top, j = cols.topk(k_aux, dim=1, sorted=False)
                    cols = torch.zeros_like(cols).scatter_(1, j, top)
                elif k_aux < num_dead:   # keep the k_aux largest = drop the smallest others
                    _, j = cols.topk(num_dead - k_aux, dim=1, largest=False, sorted=False)
                    cols = cols.scatter(1, j, 0.0)
                cols = cols.relu()
            z = dense_columns_codes(x_c, self.b_dec, self.W_enc, self.b_enc, dead_idx, cols)
            e_hat = z.to(self.W_dec.dtype) @ self.W_dec.index_select(0, dead_idx)
        else:
            top, j = cols.topk(k_aux, dim=1, sorted=False)
            idx = dead_idx[j]
            vals = gather_preacts(x_c, self.W_enc, self.b_enc, idx, top.clone(), b_dec=self.b_dec).relu()
            e_hat = sparse_decode(vals, idx, self.W_dec)
        return scale * (e_hat.float() - e.detach()).pow(2).sum() / total_var

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each (unit-norm) decoder row."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            dots = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).view(-1, 1)   # row-wise g . w without an [n, d] temporary
            g.addcmul_(dots, w, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def renormalize_decoder_keeping_output(self) -> None:
        """Unit decoder rows with each latent's contribution unchanged: row j's norm moves into
        the encoder row and bias (codes scale by it). For weights averaged over training."""
        if not self.unit_norm_decoder:
            return
        norm = self.W_dec.norm(dim=1).clamp_min(torch.finfo(self.W_dec.dtype).eps)
        self.W_dec /= norm[:, None]
        self.W_enc *= norm[:, None]
        self.b_enc *= norm
        self.scale_thresholds(norm)

    def scale_thresholds(self, factor: torch.Tensor) -> None:
        """Codes of latent j now come out `factor[j]` times larger: rescale any learned threshold."""

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """Make an SAE trained on `x * s` take raw `x` (codes and reconstruction in raw units)."""
        self.b_dec /= s
        self.b_enc /= s
        self.cfg.input_scale = float(self.cfg.input_scale) * float(s)

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        """Pre-encoder bias at the geometric median (Weiszfeld), the mean, or zero, of a first batch."""
        how = self.cfg.b_dec_init
        if how == "zeros":
            self.b_dec.zero_()
            return
        x = x.float()
        m = x.mean(0)
        if how == "geometric_median":
            m = geometric_median(x, m)
        self.b_dec.copy_(m.to(self.b_dec.dtype))


def initial_decoder(cfg: SAEConfig) -> torch.Tensor:
    """The decoder rows at initialisation: random unit rows from `cfg.seed` (float32, CPU)."""
    gen = torch.Generator().manual_seed(int(cfg.seed))
    w = torch.randn(cfg.n_latents, cfg.d_in, generator=gen, dtype=torch.float32)
    return w / w.norm(dim=1, keepdim=True)


@dataclass
class KParams:
    k: int | None = None      # active latents per token (on average for batch-level variants)


class KSparseSAE(SAE):
    """Base of the architectures whose sparsity knob is `k` (folder name `<arch>-k<k>`)."""

    Params = KParams

    @classmethod
    def folder_name(cls, cfg: SAEConfig) -> str:
        return f"{cls.arch}-k{cfg.k}"

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        try:
            k = int(cfg.k)
        except (TypeError, ValueError):
            raise UserError(f"SAE architecture {cls.arch} needs k, an integer >= 1 (got {cfg.k!r}); set k in the "
                            "sweep config.") from None
        if k < 1:
            raise UserError(f"SAE architecture {cls.arch} needs k >= 1 (got {k}); set k in the sweep config.")
        if k > cfg.n_latents:
            raise UserError(f"k={k} is larger than the SAE width ({cfg.n_latents} latents); "
                            "choose a smaller k or a wider SAE.")
        cfg.params["k"] = k


def geometric_median(x: torch.Tensor, start: torch.Tensor | None = None, iters: int = 30) -> torch.Tensor:
    """Weiszfeld's iteration for the point minimising the sum of Euclidean distances to the rows of x."""
    m = x.mean(0) if start is None else start.clone()
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= 1e-6 * (m.norm() + 1e-12):
            return new
        m = new
    return m
