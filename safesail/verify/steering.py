"""Steering strength in units of the residual stream's norm (Neuronpedia-style calibration).

A latent's 0.999-quantile activation says how big its own contribution to the MLP output is; it
says nothing about how big that is next to the residual stream the model reads after the block,
which grows with depth. With `verify.strength_unit: residual` a strength `a` adds a vector of
norm `a * R` along the latent's unit decoder direction, `R` the median per-token norm of the
residual stream after the hooked block on the query prompts (the first position, an attention
sink with an outsized norm in most models, and chat-template special tokens left out), so one
strength means the same push at every layer. `quantile_strength` converts it back to the
normalized-activation strength `/api/steer` and `safesail diagnose --add` take.
"""

from __future__ import annotations

import torch

from safesail.hooks import HookPoint, capture_activations, special_token_mask

UNITS = ("quantile", "residual")


@torch.no_grad()
def residual_norm(lm, hp: HookPoint, prompts: list[list[int]]) -> float:
    """Median per-token norm of the residual stream after block `hp.layer` over `prompts`."""
    resid = HookPoint(hp.layer, "resid")
    norms = []
    for p in prompts:
        ids = torch.tensor([p], device=lm.device)
        x = capture_activations(lm.model, ids, None, [resid])[resid.name][0].float()
        keep = ~special_token_mask(lm.tokenizer, ids)[0]
        keep[0] = False
        if bool(keep.any()):
            norms.append(x[keep].norm(dim=-1).cpu())
    if not norms:
        return 0.0
    return float(torch.cat(norms).median())


def quantile_strength(scale: float, direction_norm: float, strength: float, resid: float) -> float:
    """The normalized-activation strength (x the latent's 0.999 quantile) that adds a vector of norm
    `strength * resid` along a decoder row of norm `direction_norm`."""
    return float(strength) * float(resid) / (float(scale) * float(direction_norm))
