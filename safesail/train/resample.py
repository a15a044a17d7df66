"""Dead-latent resampling: give latents that stopped firing a fresh start toward badly reconstructed inputs.

AuxK (safesail/saes/base.py) pulls dead latents toward the residual by a gradient; a latent
that died early often never comes back within a short run (planted data: 6% dead on `easy`,
24% on `hard`, each an atom lost). `resample_dead(sae, opt, dead, x, recon, enc_scale)`
re-initialises each dead latent from one training row drawn with probability proportional to
its squared reconstruction error (Bricken et al. 2023, "Towards Monosemanticity"): decoder row =
the row's unit residual, encoder row = the same direction times `enc_scale` times the mean
norm of the live encoder rows, encoder bias 0, and the optimiser state of those rows reset
(Adam moments zeroed; schedule-free signum's `z` set to the new weights, so its average
restarts there too). The trainer calls it every `resample_every` steps until
`resample_until` of the run (TrainOptions; docs/training.md has the measurements).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def resample_dead(sae, opt: torch.optim.Optimizer, dead: torch.Tensor, x: torch.Tensor, recon: torch.Tensor,
                  enc_scale: float = 0.2, generator: torch.Generator | None = None) -> int:
    """Re-initialise the latents where `dead` is True from rows of `x` (normalised training rows) with
    large error `x - recon`; return how many were resampled."""
    idx = dead.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    err = (x.float() - recon.float())
    weight = err.pow(2).sum(1)
    if float(weight.sum()) <= 0:
        return 0
    rows = torch.multinomial(weight, idx.numel(), replacement=True, generator=generator)
    direction = torch.nn.functional.normalize(err[rows], dim=1).to(sae.W_dec.dtype)
    alive = ~dead
    enc_norm = sae.W_enc[alive].norm(dim=1).mean() if bool(alive.any()) else sae.W_enc.norm(dim=1).mean()
    sae.W_dec[idx] = direction
    sae.W_enc[idx] = direction * (enc_scale * enc_norm)
    sae.b_enc[idx] = 0
    _reset_state(opt, sae, idx)
    return int(idx.numel())


def _reset_state(opt: torch.optim.Optimizer, sae, idx: torch.Tensor) -> None:
    rows_of = {id(sae.W_dec): 0, id(sae.W_enc): 0, id(sae.b_enc): 0}   # latent index is dim 0 of each
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in rows_of:
                continue
            st = opt.state.get(p)
            if not st:
                continue
            if "z" in st:                      # schedule-free signum: the average restarts at the new weights
                st["z"][idx] = p[idx]
            for key in ("exp_avg", "exp_avg_sq"):   # Adam
                if key in st:
                    st[key][idx] = 0
