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

from safesail.hooks import HookPoint

UNITS = ("quantile", "residual")


@torch.no_grad()
def residual_norm(lm, hp: HookPoint, prompts: list[list[int]]) -> float:
    """Median per-token norm of the residual stream after block `hp.layer` over `prompts`."""
    from safesail.verify.generation import residual_norms   # one loop for one hook and for several

    return residual_norms(lm, [hp], prompts)[hp.name]


def quantile_strength(scale: float, direction_norm: float, strength: float, resid: float) -> float:
    """The normalized-activation strength (x the latent's 0.999 quantile) that adds a vector of norm
    `strength * resid` along a decoder row of norm `direction_norm`."""
    return float(strength) * float(resid) / (float(scale) * float(direction_norm))
