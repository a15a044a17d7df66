"""Per-latent statistics accumulated over a token stream, in bounded memory.

`RunningLatentStats.update(codes)` takes a block of dense codes `[n_tokens, m]`
(special tokens already removed) and keeps, per latent: the number of tokens
seen and of tokens where it fires (density), the `k_top` largest activations
with their global token index (a running top-k merge), and the `k_top`
smallest activations. `finish()` adds the approximate 0.999 quantile.

`LatentHistogram` counts activating (> 0) values in `n_bins` equal bins over
`[0, max_act]` per latent; it needs the maximum first, so it runs in a second
pass over the same stream.
"""

from __future__ import annotations

import math

import torch

from safesail.interpret.records import QUANTILE_KEY  # the key of the q quantile (q = collect.quantile)


def quantile_from_top(top_desc: torch.Tensor, num_tokens: int, q: float = 0.999) -> tuple[torch.Tensor, bool]:
    """Approximate q-quantile of each row's full distribution from its largest values.

    Over `num_tokens` values sorted descending, the q-quantile (linear interpolation,
    as numpy's default) sits at rank `r = (1 - q) * (num_tokens - 1)` from the top.
    When `r` falls inside the kept top-k it is interpolated between the two
    neighbouring kept values (Safe-SAIL's approach); when it does not, the k-th
    largest value is returned (an upper bound) and the flag says so.
    """
    m, k = top_desc.shape
    if num_tokens <= 0 or k == 0:
        return torch.zeros(m, dtype=torch.float32), False
    r = (1.0 - q) * (num_tokens - 1)
    exact = r <= k - 1
    r = min(r, k - 1)
    lo, frac = int(math.floor(r)), r - math.floor(r)
    hi = min(lo + 1, k - 1)
    vals = top_desc[:, lo] * (1 - frac) + top_desc[:, hi] * frac
    return vals.float(), exact


class RunningLatentStats:
    def __init__(self, m: int, k_top: int):
        self.m, self.k = int(m), int(k_top)
        self.num_tokens = 0
        self.fire_count = torch.zeros(m, dtype=torch.int64)
        self.top_vals = torch.empty(m, 0)
        self.top_idx = torch.empty(m, 0, dtype=torch.int64)
        self.bottom_vals = torch.empty(m, 0)

    def update(self, codes: torch.Tensor, token_index: torch.Tensor) -> None:
        """codes [n, m] float; token_index [n] int64 global index of each token."""
        if codes.numel() == 0:
            return
        codes = codes.float()
        n = codes.shape[0]
        self.num_tokens += n
        self.fire_count += (codes > 0).sum(0)
        vals_t = codes.T  # [m, n]
        cat_v = torch.cat([self.top_vals, vals_t], dim=1)
        cat_i = torch.cat([self.top_idx, token_index.view(1, -1).expand(self.m, -1)], dim=1)
        k = min(self.k, cat_v.shape[1])
        v, j = torch.topk(cat_v, k, dim=1, largest=True, sorted=True)
        self.top_vals, self.top_idx = v, torch.gather(cat_i, 1, j)
        cat_b = torch.cat([self.bottom_vals, vals_t], dim=1)
        self.bottom_vals = torch.topk(cat_b, min(self.k, cat_b.shape[1]), dim=1, largest=False, sorted=True).values

    def state(self) -> dict[str, torch.Tensor]:
        return {"num_tokens": torch.tensor(self.num_tokens), "fire_count": self.fire_count,
                "top_vals": self.top_vals, "top_idx": self.top_idx, "bottom_vals": self.bottom_vals}

    def finish(self, q: float = 0.999) -> tuple[dict[str, torch.Tensor], bool]:
        """The stats tensors (padded to k_top with 0 if fewer tokens were seen) and whether the
        quantile's rank fell inside the kept top-k."""
        pad = self.k - self.top_vals.shape[1]
        top = torch.nn.functional.pad(self.top_vals, (0, pad)) if pad > 0 else self.top_vals
        bottom = torch.nn.functional.pad(self.bottom_vals, (0, pad)) if pad > 0 else self.bottom_vals
        q_vals, exact = quantile_from_top(self.top_vals, self.num_tokens, q)
        density = self.fire_count.float() / max(1, self.num_tokens)
        max_act = top[:, 0] if top.shape[1] else torch.zeros(self.m)
        return {"density": density.float(), "top_acts": top.float().contiguous(),
                "bottom_acts": bottom.float().contiguous(), QUANTILE_KEY: q_vals.contiguous(),
                "max_act": max_act.float().contiguous()}, exact


class LatentHistogram:
    """Counts of activating values in `n_bins` equal bins over [0, max_act] per latent."""

    def __init__(self, max_act: torch.Tensor, n_bins: int):
        self.max_act = max_act.float().clamp_min(1e-12)
        self.n_bins = int(n_bins)
        self.counts = torch.zeros(len(max_act), self.n_bins, dtype=torch.int64)

    def update(self, codes: torch.Tensor) -> None:
        rows, cols = torch.nonzero(codes > 0, as_tuple=True)
        if rows.numel() == 0:
            return
        vals = codes[rows, cols].float()
        b = torch.clamp((vals / self.max_act[cols] * self.n_bins).long(), 0, self.n_bins - 1)
        self.counts.view(-1).index_add_(0, cols * self.n_bins + b, torch.ones_like(b))

    def edges(self) -> torch.Tensor:
        steps = torch.linspace(0, 1, self.n_bins + 1)
        return (self.max_act.view(-1, 1) * steps.view(1, -1)).float().contiguous()
