"""Planted dictionaries: synthetic activations built from known atoms, to check that training recovers them.

`PlantedData(variant)` draws rows `x = sum_i c_i a_i + noise` from unit atoms `a_i` (clustered:
atoms of a cluster share a direction, so they are correlated) with power-law firing
frequencies and random magnitudes; `mmcs(W_dec, atoms)` is the mean over atoms of the best
cosine with any decoder row (1.0: every atom found). Variants (`VARIANTS`):

| variant | d | atoms | mean active | cluster share | frequency power |
|---|---|---|---|---|---|
| easy | 64 | 256 | 5 | 0.2 | 0.5 |
| hard | 64 | 512 | 8 | 0.5 | 1.0 |
| hard2 | 96 | 1024 | 10 | 0.6 | 1.2 (held out: the recipe sweep never tuned on it) |

`planted_recipe(k)` is the recipe measured on them (docs/training.md, session 6): OMP (pursuit
`refit: ls`, `select: decoder`) with exactly `k` latents a token and the duplicate split for the
first 30% of the run (`TrainOptions.warm_k`), then up to `2k` latents a token, a token stopping once
its residual is at most 6% of it (pursuit `stop: 0.06`); Adam, batch 256.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from safesail.errors import UserError


@dataclass(frozen=True)
class Variant:
    d: int
    n_atoms: int
    active: float          # mean atoms per row
    share: float           # weight of the cluster direction in each atom (correlation)
    power: float           # firing probability of atom i ~ (i + 1) ** -power
    cluster: int = 8       # atoms per cluster
    noise: float = 0.01
    mag_low: float = 0.5   # magnitudes of active atoms: uniform on [mag_low, mag_low + mag_span]
    mag_span: float = 1.0
    exact: bool = False    # every row holds exactly `active` atoms (drawn by frequency, no repeats), not a
                           # Bernoulli draw per atom (whose count per row varies: Poisson-like around `active`)


VARIANTS = {
    "easy": Variant(d=64, n_atoms=256, active=5, share=0.2, power=0.5),
    "hard": Variant(d=64, n_atoms=512, active=8, share=0.5, power=1.0),
    "hard2": Variant(d=96, n_atoms=1024, active=10, share=0.6, power=1.2),
}


class PlantedData:
    def __init__(self, variant: str | Variant = "easy", seed: int = 0):
        self.v = VARIANTS[variant] if isinstance(variant, str) else variant
        v = self.v
        # offset: an SAE initialised with seed s draws the same normal stream as torch.Generator(s),
        # and atoms drawn from it would start out matched by the SAE's random decoder
        self.gen = torch.Generator().manual_seed(7_919_000 + seed)
        centres = torch.randn(v.n_atoms // v.cluster + 1, v.d, generator=self.gen)
        centres /= centres.norm(dim=1, keepdim=True)
        own = torch.randn(v.n_atoms, v.d, generator=self.gen)
        own /= own.norm(dim=1, keepdim=True)
        atoms = v.share * centres[torch.arange(v.n_atoms) // v.cluster] + (1 - v.share) * own
        self.atoms = atoms / atoms.norm(dim=1, keepdim=True)
        p = (torch.arange(v.n_atoms, dtype=torch.float64) + 1) ** -v.power
        p = p[torch.randperm(v.n_atoms, generator=self.gen)]
        self.prob = (p * v.active / p.sum()).clamp(max=1.0).float()

    def sample(self, rows: int) -> torch.Tensor:
        if self.v.exact:
            j = torch.multinomial(self.prob.expand(rows, -1), int(self.v.active), replacement=False, generator=self.gen)
            on = torch.zeros(rows, self.v.n_atoms, dtype=torch.bool).scatter_(1, j, True)
        else:
            on = torch.rand(rows, self.v.n_atoms, generator=self.gen) < self.prob
        mag = torch.rand(rows, self.v.n_atoms, generator=self.gen) * self.v.mag_span + self.v.mag_low
        x = (on * mag) @ self.atoms
        return x + self.v.noise * torch.randn(rows, self.v.d, generator=self.gen)

    def batches(self, batch: int, samples: int) -> list[torch.Tensor]:
        return [self.sample(batch) for _ in range(max(1, samples // batch))]


def mmcs(w_dec: torch.Tensor, atoms: torch.Tensor) -> float:
    """Mean over atoms of the largest cosine similarity with any decoder row."""
    w = torch.nn.functional.normalize(w_dec.detach().float(), dim=1)
    a = torch.nn.functional.normalize(atoms.float(), dim=1)
    return float((a @ w.T).max(dim=1).values.mean())


def planted_recipe(k: int, dec_init: str = "data") -> tuple[dict[str, Any], dict[str, Any]]:
    """(SAE config keys, TrainOptions fields) of the planted recipe for `k` latents a token (about the mean
    number of atoms a row holds); add d_in, n_latents and seed to the first, and batches of 256 rows."""
    if not isinstance(k, int) or k < 1:
        raise UserError(f"the planted recipe needs k, an integer >= 1 (got {k!r}).")
    sae = {"arch": "pursuit", "k": 2 * k, "stop": 0.06, "refit": "ls", "select": "decoder", "optimizer": "adam",
           "dec_init": dec_init}
    opts = {"warm_k": k, "warm_until": 0.3, "split_every": 10, "split_cos": 0.8, "resample_until": 0.9}
    return sae, opts
