"""Decoder init from the data (`dec_init: data`): latents start at training rows, not at random directions.

After b_dec is set on the first batch, `init_decoder_from_data(sae, x, seed)` makes decoder
row j the unit vector of `x[r_j] - b_dec` for distinct rows `r_j` of that batch (drawn with
the SAE's seed), and the encoder row its copy times `enc_init_scale` (as the random init
does); when the SAE has more latents than the batch has rows, the latents beyond the batch
keep their random start. Encoder biases stay 0.

Why: on planted dictionaries a latent that starts at a data row starts inside the span of
the atoms that row contains, where a random direction in d dimensions starts nearly
orthogonal to all of them (docs/training.md, session 3: MMCS at 250k samples easy 0.944-0.954
-> 0.957-0.969, hard 0.721-0.728 -> 0.746-0.750). Off by default (`random`): on real
activations it left 35-37% of the latents dead (7% from random) and lost FVU at k = 64.
With at least as many latents as rows every seed starts from the same rows (in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEC_INITS = ("random", "data")


@torch.no_grad()
def init_decoder_from_data(sae, x: torch.Tensor, seed: int) -> int:
    """Set the first min(n_latents, rows) decoder/encoder rows from distinct rows of `x` (normalised
    training rows); return how many latents were set. Rows equal to b_dec (zero after centring) are skipped."""
    cfg = sae.cfg
    xc = x.float() - sae.b_dec.float()
    keep = xc.norm(dim=1) > 1e-6 * (xc.norm(dim=1).max() + 1e-30)
    xc = xc[keep]
    n = min(cfg.n_latents, xc.shape[0])
    if n == 0:
        return 0
    gen = torch.Generator().manual_seed(int(cfg.seed) * 7_919 + 17)
    rows = torch.randperm(xc.shape[0], generator=gen)[:n].to(xc.device)
    w = F.normalize(xc[rows], dim=1)
    enc_scale = float(cfg.enc_init_scale) if cfg.enc_init == "decoder_scaled" else 1.0
    sae.W_dec[:n] = w.to(sae.W_dec.dtype)
    sae.W_enc[:n] = (w * enc_scale).to(sae.W_enc.dtype)
    return n


@torch.no_grad()
def data_initial_decoder(cfg, x: torch.Tensor) -> torch.Tensor:
    """The decoder a `dec_init: data` SAE of `cfg` started from, rebuilt from its first batch `x` (normalised,
    as the trainer saw it): for the drift signal (safesail/train/signals.py) without keeping a copy per SAE."""
    from safesail.saes import build_sae

    sae = build_sae(cfg, device="cpu")
    x = x.float().cpu()
    sae.init_b_dec(x)
    init_decoder_from_data(sae, x, cfg.seed)
    return sae.W_dec.detach().float()
