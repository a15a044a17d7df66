"""Signals that expose an SAE run that learned nothing, though its FVU may look fine.

A decoder can stay at its random start while the encoder alone fits a plausible FVU (seen on a
hard planted dictionary: FVU 0.53, no atom recovered). These figures go into metrics.json:

- `decoder_init_cos`: mean |cosine| between each decoder row and its row at initialisation
  (regenerated from the seed; for `dec_init: data`, rebuilt from the first batch). Near 1: the
  decoder did not move.
- `enc_dec_cos`: mean cosine between each latent's encoder and decoder rows; learned
  dictionaries keep them aligned (about 0.5-0.9); near 0 the two halves disagree.
- `dead_fraction` / `dense_fraction`: latents that never fire / fire on more than 10% of the
  held-out tokens (from evaluate.py).
- `fvu_plateau`: relative FVU drop over the second half of training (from the FVU curve);
  near 0 with a high FVU: training stalled.
- `seed_mmcs` (when a twin with another seed exists, e.g. in the recipe sweep): mean best
  cosine between the two decoders; features that are real come back with another seed.
`warnings(metrics)` names the signals that fired, with the thresholds below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safesail.saes.base import SAE, initial_decoder

DRIFT_MAX = 0.9        # decoder_init_cos above this: the decoder barely moved
ALIGN_MIN = 0.2        # enc_dec_cos below this
DEAD_MAX = 0.5
DENSE_MAX = 0.05
PLATEAU_MIN = 0.01     # second-half relative FVU gain below this ...
PLATEAU_FVU = 0.5      # ... while FVU is still above this


@torch.no_grad()
def weight_signals(sae: SAE, init: torch.Tensor | None = None, drift: bool = True) -> dict[str, float]:
    """`init`: the decoder at the start (default: the random one regenerated from the seed; a data-initialised
    decoder passes its own, or `drift=False` when it cannot be rebuilt)."""
    w_dec = sae.W_dec.detach().float().cpu()
    w_enc = sae.W_enc.detach().float().cpu()
    out = {"enc_dec_cos": float(F.cosine_similarity(w_dec, w_enc, dim=1).mean())}
    if drift:
        init = initial_decoder(sae.cfg) if init is None else init.float().cpu()
        out["decoder_init_cos"] = float(F.cosine_similarity(w_dec, init, dim=1).abs().mean())
    return out


def curve_signals(curve: list[list[float]]) -> dict[str, float]:
    """From `[[step, fvu], ...]`: the relative FVU drop between the middle and the end of training."""
    if len(curve) < 3:
        return {}
    mid = curve[len(curve) // 2][1]
    end = curve[-1][1]
    return {"fvu_plateau": float((mid - end) / mid) if mid > 0 else 0.0}


@torch.no_grad()
def decoder_mmcs(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over rows of `a` of the best cosine with a row of `b` (seed stability, planted recovery)."""
    a = F.normalize(a.detach().float().cpu(), dim=1)
    b = F.normalize(b.detach().float().cpu(), dim=1)
    best = torch.cat([(a[i:i + chunk] @ b.T).max(dim=1).values for i in range(0, a.shape[0], chunk)])
    return float(best.mean())


def warnings(m: dict) -> list[str]:
    out = []
    if m.get("decoder_init_cos", 0) > DRIFT_MAX:
        out.append(f"decoder_init_cos {m['decoder_init_cos']:.2f} > {DRIFT_MAX}: the decoder stayed near its random start")
    if m.get("enc_dec_cos", 1) < ALIGN_MIN:
        out.append(f"enc_dec_cos {m['enc_dec_cos']:.2f} < {ALIGN_MIN}: encoder and decoder disagree")
    if m.get("dead_fraction", 0) > DEAD_MAX:
        out.append(f"dead_fraction {m['dead_fraction']:.2f} > {DEAD_MAX}")
    if m.get("dense_fraction", 0) > DENSE_MAX:
        out.append(f"dense_fraction {m['dense_fraction']:.2f} > {DENSE_MAX}")
    if m.get("fvu_plateau", 1) < PLATEAU_MIN and m.get("fvu", m.get("train_fvu", 0)) > PLATEAU_FVU:
        out.append(f"FVU plateaued at {m.get('fvu', m.get('train_fvu')):.2f} (second-half gain "
                   f"{m['fvu_plateau']:.3f})")
    return out
