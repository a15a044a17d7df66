"""Where a planted run loses its atoms, and whether the mixture score (safesail/train/split.py) tells the latents apart.

    OMP_NUM_THREADS=1 python benchmarks/bench_planted_probe.py --variant easy \\
        '[{"k": 5}, {"k": 5, "arch": "pursuit", "optimizer": "adam", "batch": 256}]'

Trains each entry (an SAE config for `train_saes`, width = the atom count; `batch`, default 1,024;
250k samples) and prints one JSON line: MMCS; the atoms missed (best decoder cosine < 0.9), their
median frequency rank (0 = most frequent) and mean best cosine; dead latents (silent on 8,192
held-out rows); live latents that match no atom, their firing rate against the matched ones' and
their mean cosine to their two nearest atoms; MMCS over the atoms found; and the mixture score
(`split.mixture_scores`: second / first eigenvalue of what a latent explains) at the 5th / 50th /
95th percentile for matched and unmatched live latents. Also the atoms' own separation.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from safesail.train.planted import PlantedData, VARIANTS
from safesail.train.split import mixture_scores
from safesail.train.trainer import TrainOptions, train_saes


def quantiles(v: torch.Tensor) -> list[float] | None:
    return [round(float(q), 3) for q in v.quantile(torch.tensor([0.05, 0.5, 0.95]))] if v.numel() else None


def probe(entry: dict, pdata: PlantedData, samples: int) -> dict:
    g = dict(entry)
    batch = int(g.pop("batch", 1024))
    cfg = {"arch": "topk", "d_in": pdata.v.d, "n_latents": pdata.v.n_atoms, "seed": 0, **g}
    [t] = train_saes(pdata.batches(batch, samples), [cfg], TrainOptions(progress=False, log_every=10 ** 9))
    sae, atoms = t.sae, pdata.atoms
    held = pdata.sample(8192)
    with torch.no_grad():
        vals, idx = sae.encode_sparse(held)
        z = torch.zeros(held.shape[0], sae.cfg.n_latents).scatter_(1, idx, vals)
        recon = sae.decode(z)
        score, rows = mixture_scores(sae, held, recon, idx, vals)
    w = F.normalize(sae.W_dec.detach(), dim=1)
    cos = atoms @ w.T
    best, _ = cos.max(1)
    miss = best < 0.9
    rank = pdata.prob.argsort(descending=True).argsort()
    dead = (z > 0).sum(0) == 0
    lat_best = cos.max(0).values
    unmatched = (lat_best < 0.9) & ~dead
    matched = (lat_best >= 0.9) & ~dead
    top2 = cos.topk(2, dim=0).values
    live = rows >= 8
    return {"mmcs": round(float(best.mean()), 4), "missed": int(miss.sum()),
            "missed_rank_median": float(rank[miss].float().median()) if miss.any() else None,
            "missed_best_cos": round(float(best[miss].mean()), 3) if miss.any() else None,
            "dead": int(dead.sum()), "live_unmatched": int(unmatched.sum()),
            "fire_rate_unmatched": round(float((z[:, unmatched] > 0).float().mean()), 4) if unmatched.any() else None,
            "fire_rate_matched": round(float((z[:, matched] > 0).float().mean()), 4),
            "unmatched_top2_cos": [round(float(c), 3) for c in top2[:, unmatched].mean(1)] if unmatched.any() else None,
            "mmcs_found": round(float(best[~miss].mean()), 4),
            "mix_score_matched": quantiles(score[matched & live]), "mix_score_unmatched": quantiles(score[unmatched & live])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", help="JSON list of settings")
    ap.add_argument("--variant", default="easy", choices=sorted(VARIANTS))
    ap.add_argument("--samples", type=int, default=250_000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    pdata = PlantedData(a.variant)
    c = (pdata.atoms @ pdata.atoms.T).fill_diagonal_(0).abs()
    print(json.dumps({"variant": a.variant, "atom_max_cos": round(float(c.max()), 3),
                      "atom_nearest_cos_p99": round(float(c.max(1).values.quantile(0.99)), 3)}), flush=True)
    for g in json.loads(a.grid):
        print(json.dumps({"variant": a.variant, **g, **probe(g, pdata, a.samples)}), flush=True)


if __name__ == "__main__":
    main()
