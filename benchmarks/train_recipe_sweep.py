"""The recipe sweep of docs/training.md: train_saes under settings given as JSON, one line of figures each.

    python benchmarks/train_recipe_sweep.py --cache runs/<name>/activations/layers.14.mlp_out \\
        '[{"k": 32}, {"k": 32, "optimizer": "adam", "lr": 0.0016}, {"k": 32, "opt": {"dead_tokens": 16384}}]'
    python benchmarks/train_recipe_sweep.py --planted easy --samples 250000 --batch 1024 '[{"k": 5}]'

Each entry is an SAE config (arch topk unless given; width 5,760 for real data, the atom count for
planted data, unless `n` is set); an `opt` object sets TrainOptions. Printed: held-out FVU, dead
fraction, seconds, and MMCS to the true atoms for planted data. One torch thread.
`epochs` (entry key, real data): passes over the cache, each reshuffled. `--seed-check`: also
train each entry from seed + 1 and print `seed_mmcs`, the decoder MMCS between the two seeds
(and `seed_mmcs_live`, over the latents of each that fire on the held-out rows).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from safesail.train.planted import PlantedData, mmcs
from safesail.train.trainer import TrainOptions, train_saes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", help="JSON list of settings")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--planted", default=None)
    ap.add_argument("--samples", type=int, default=250_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--seed-check", action="store_true", help="also train from seed + 1: decoder MMCS between seeds")
    a = ap.parse_args()
    torch.set_num_threads(1)
    atoms = None
    if a.planted:
        pdata = PlantedData(a.planted, seed=0)
        train, held, atoms, width = pdata.batches(a.batch, a.samples), pdata.sample(4096), pdata.atoms, pdata.v.n_atoms
    else:
        from safesail.train.activation_store import ActivationStore

        store = ActivationStore(a.cache)
        passes = {}

        def epochs(n: int) -> list:   # n passes, pass e shuffled with seed e
            for e in range(n):
                passes.setdefault(e, list(store.iter_batches(a.batch, seed=e)))
            return [b for e in range(n) for b in passes[e]]
        train = epochs(1)
        held = torch.cat(list(store.iter_batches(2048, split="eval", shuffle=False, drop_last=False)))[:4096]
        width = 10 * store.d
    for g in json.loads(a.grid):
        opt = {"progress": False, "log_every": 10 ** 9, "lr_warmup_steps": 1, **g.pop("opt", {})}
        n_ep = int(g.pop("epochs", 1))
        data = epochs(n_ep) if (n_ep > 1 and not a.planted) else train
        cfg = {"arch": "topk", "d_in": train[0].shape[1], "n_latents": g.pop("n", width), **g}
        t0 = time.perf_counter()
        [t] = train_saes(data, [cfg], TrainOptions(**opt))
        dt = time.perf_counter() - t0
        with torch.no_grad():
            z = t.sae.encode(held)
            fvu = float((held - t.sae.decode(z)).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
            dead = float(((z > 0).sum(0) == 0).float().mean())
        row = {**g, **{k: v for k, v in opt.items() if k not in ("progress", "log_every")}, "fvu": round(fvu, 4),
               "dead": round(dead, 4), "s": round(dt, 1)}
        if n_ep > 1:
            row["epochs"] = n_ep
        if atoms is not None:
            row["mmcs"] = round(mmcs(t.sae.W_dec, atoms), 4)
        if a.seed_check:
            from safesail.train.signals import decoder_mmcs

            [t2] = train_saes(data, [{**cfg, "seed": int(cfg.get("seed", 0)) + 1}], TrainOptions(**opt))
            with torch.no_grad():
                live1, live2 = (z > 0).sum(0) > 0, (t2.sae.encode(held) > 0).sum(0) > 0
            row["seed_mmcs"] = round(decoder_mmcs(t.sae.W_dec, t2.sae.W_dec), 4)
            row["seed_mmcs_live"] = round(decoder_mmcs(t.sae.W_dec[live1], t2.sae.W_dec[live2]), 4)
            row["decoder_init_cos"] = round(t.metrics.get("decoder_init_cos", float("nan")), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
