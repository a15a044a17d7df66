"""A latent's upper quantile from only its k largest activations over N tokens (Safe-SAIL's normaliser).

If a latent's activations over N tokens are sorted ascending, the j-th of its k
largest values (j = 0 .. k-1, ascending) sits at cumulative probability
(N - k + j + 1) / N. The q-quantile is read off by linear interpolation between
the two neighbouring known points. Safe-SAIL divides live activations by the
q = 0.999 value computed from its top-10,000 tables over N = 200,000 tokens.

The tables are sorted here first, so the result does not depend on the order
a file stores them in (the interpolation needs ascending values).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def approximate_upper_quantile(top: np.ndarray, q: float, num_tokens: int) -> np.ndarray:
    """q-quantile per column of `top` [k, n] (the k largest values of n latents); returns float64 [n]."""
    top = np.asarray(top, dtype=np.float64)
    if top.ndim != 2:
        raise ValueError(f"top table must be 2-D [k, n], got shape {top.shape}")
    k, n = top.shape
    if k == 0 or n == 0:
        return np.zeros(n)
    vals = np.sort(top, axis=0)  # ascending along k
    if k == 1:
        return vals[0].copy()
    p = (num_tokens - k + np.arange(1, k + 1)) / num_tokens
    if q < p[0]:
        log.warning("q=%.4f lies below what the top-%d of %d tokens covers (>= %.4f); using the smallest known "
                    "top value", q, k, num_tokens, p[0])
        return vals[0].copy()
    if q >= p[-1]:
        return vals[-1].copy()
    j = int(np.clip(np.searchsorted(p, q, side="right") - 1, 0, k - 2))
    frac = (q - p[j]) / (p[j + 1] - p[j])
    return vals[j] + frac * (vals[j + 1] - vals[j])
