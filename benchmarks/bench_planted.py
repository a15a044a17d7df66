"""Planted-dictionary recovery under recipe settings, with the diagnostics that say why a run misses atoms.

    OMP_NUM_THREADS=1 python benchmarks/bench_planted.py --variant hard --samples 250000 \\
        '[{"k": 8}, {"k": 8, "batch": 256}, {"k": 8, "dec_init": "data"}, {"k": 8, "init": "oracle"}]'

Each entry is an SAE config for `train_saes` (arch topk unless given, width = the atom count
unless `n` is set) plus bench keys: `batch` (rows per step, default --batch), `samples`
(training rows, default --samples), `epochs` (passes over those same rows: more compute, not more
data; report apart), `opt` (TrainOptions fields), `seeds` (a list: also the
decoder MMCS between the first two seeds' decoders), `init: oracle` (start the decoder and
encoder at the true atoms: is the dictionary a resting point of the objective at all?), and
trial-only knobs (`k_start`/`k_until`: k annealed down to k; `freeze`: parameters kept at their
init; `sgd`: plain SGD; `resample_scale`: encoder norm of resampled latents; `redundant`: a cosine at which
resampling also restarts the less recently fired of two decoder rows, with `opt.resample_every`).
`"recipe": k` expands to `planted.planted_recipe(k)` (its SAE keys and TrainOptions; other keys of the
entry override them). `"arch": "pursuit"` (safesail/saes/archs/pursuit.py) chooses the k latents in greedy rounds. `dec_init` is the
SAE config key (`data`, the default, or `random`).
Printed per entry, one JSON line: MMCS to the true atoms, `recovered` (share of atoms with a
decoder row at cosine >= 0.9), MMCS of the frequent / middle / rare thirds of the atoms,
`dup` (latents matching an atom at >= 0.9 that another latent already matches better),
`centre` (latents closer to a cluster's mean direction than to any of its atoms), held-out
FVU and dead share, and ours' learned-nothing signals (safesail/train/signals.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import time
from unittest import mock

import torch
import torch.nn.functional as F

from safesail.train.planted import PlantedData, VARIANTS, mmcs, planted_recipe
from safesail.train.signals import decoder_mmcs
from safesail.train.trainer import TrainOptions, train_saes


def diagnose(w_dec: torch.Tensor, pdata: PlantedData) -> dict:
    """Where the recovery is lost: by atom frequency, duplicates, cluster-mean latents."""
    w = F.normalize(w_dec.detach().float(), dim=1)
    atoms = pdata.atoms
    cos = atoms @ w.T                                   # [atoms, latents]
    best = cos.max(dim=1).values
    order = pdata.prob.argsort(descending=True)         # frequent first
    thirds = torch.tensor_split(order, 3)
    lat_best, lat_atom = cos.max(dim=0)                 # each latent's best atom
    dup = 0
    good = lat_best >= 0.9
    for a in lat_atom[good].unique():
        dup += int(((lat_atom == a) & good).sum()) - 1
    v = pdata.v
    clusters = torch.arange(v.n_atoms) // v.cluster
    means = F.normalize(torch.stack([atoms[clusters == c].mean(0) for c in range(int(clusters.max()) + 1)]), dim=1)
    to_mean = (w @ means.T).max(dim=1).values
    centre = int((to_mean > lat_best).sum())
    return {"mmcs": round(float(best.mean()), 4), "recovered": round(float((best >= 0.9).float().mean()), 4),
            "mmcs_thirds": [round(float(best[t].mean()), 3) for t in thirds], "dup": dup, "centre": centre}


def oracle_patch(atoms: torch.Tensor):
    """initial_decoder() -> the true atoms (the SAE and the drift signal both read it)."""
    def init(cfg):
        return atoms.clone()
    return mock.patch.multiple("safesail.saes.base", initial_decoder=init), \
        mock.patch("safesail.train.signals.initial_decoder", init)


def k_anneal_patch(k_start: int, k_end: int, until: float):
    from safesail.train.trainer import SAETrainState
    orig = SAETrainState.train_step

    def train_step(self, *a):
        total = self.opts.total_steps or 1
        f = min(1.0, self.step / max(1.0, until * total))
        self.sae.cfg.params["k"] = int(round(k_start + (k_end - k_start) * f))
        return orig(self, *a)
    return mock.patch.object(SAETrainState, "train_step", train_step)


def freeze_patch(names: list[str]):
    from safesail.train import trainer
    orig = trainer.build_sae

    def build(cfg, device=None):
        sae = orig(cfg, device=device)
        for n in names:
            getattr(sae, n).requires_grad_(False)
        return sae
    return mock.patch.object(trainer, "build_sae", build)


def sgd_patch(momentum: float):
    from safesail.train import optim, trainer

    class SGDOpt(torch.optim.SGD):
        @contextlib.contextmanager
        def eval_params(self):
            yield

    def make(name, params, lr, betas=None, eps=None):
        return SGDOpt(params, lr=lr, momentum=momentum)
    return mock.patch.object(trainer, "make_optimizer", make)


def redundant_patch(threshold: float):
    """Resampling also restarts redundant latents: of two decoder rows at cosine >= threshold, the one
    silent longer (trial of a coherence-based resample)."""
    from safesail.train import resample, trainer
    orig_step = trainer.SAETrainState.train_step

    def train_step(self, *a):
        self._bench_stale = self.stale
        return orig_step(self, *a)

    def resample_both(sae, opt, dead, x, recon, **kw):
        w = F.normalize(sae.W_dec.detach().float(), dim=1)
        cos = (w @ w.T).fill_diagonal_(0)
        stale = torch.zeros(w.shape[0])
        for st in _STATES:
            if st.sae is sae:
                stale = st.stale.float()
        i, j = (cos >= threshold).nonzero(as_tuple=True)
        worse = torch.where(stale[i] > stale[j], i, torch.where(stale[i] < stale[j], j, torch.maximum(i, j)))
        mask = dead.clone()
        mask[worse] = True
        return resample.resample_dead(sae, opt, mask, x, recon, **kw)
    orig_init = trainer.SAETrainState.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        _STATES.append(self)
    return [mock.patch.object(trainer, "resample_dead", resample_both),
            mock.patch.object(trainer.SAETrainState, "__init__", init)]


_STATES: list = []


def _train(init: str, train, cfg: dict, opt: dict, pdata: PlantedData, seed: int):
    if init == "oracle":
        p1, p2 = oracle_patch(pdata.atoms)
        with p1, p2:
            return train_saes(train, [cfg], TrainOptions(**opt))
    return train_saes(train, [cfg], TrainOptions(**opt))


def run_entry(g: dict, args, data_cache: dict) -> dict:
    g = dict(g)
    if "recipe" in g:   # planted.planted_recipe(k): its SAE keys and TrainOptions, entry keys on top
        sae, opts = planted_recipe(int(g.pop("recipe")), g.pop("dec_init", "data"))
        g = {**sae, **g, "opt": {**opts, **g.get("opt", {})}}
    batch, samples = int(g.pop("batch", args.batch)), int(g.pop("samples", args.samples))
    seeds = g.pop("seeds", [g.pop("seed", 0)])
    init = g.pop("init", "random")
    rs_scale = g.pop("resample_scale", None)
    k_start, k_until = g.pop("k_start", None), float(g.pop("k_until", 0.5))
    freeze = g.pop("freeze", [])           # parameter names kept at their init (e.g. ["b_enc"])
    redundant = g.pop("redundant", None)  # cosine: resampling also restarts the less used of two such decoder rows
    sgd = g.pop("sgd", None)               # {"momentum": 0.9}: plain SGD instead of the config's optimiser (trial)
    opt = {"progress": False, "log_every": 10 ** 9, **g.pop("opt", {})}
    key = (batch, samples)
    if key not in data_cache:
        pdata = PlantedData(args.pvariant, seed=args.data_seed)
        data_cache[key] = (pdata, pdata.batches(batch, samples), pdata.sample(4096))
    pdata, train, held = data_cache[key]
    epochs = int(g.pop("epochs", 1))       # passes over the same `samples` rows (reported apart: compute grows, data does not)
    train = train * epochs
    width = int(g.pop("n", pdata.v.n_atoms))
    out, decs = {}, []
    for seed in seeds:
        cfg = {"arch": "topk", "d_in": pdata.v.d, "n_latents": width, "seed": seed, **g}
        t0 = time.perf_counter()
        patches = contextlib.ExitStack()
        if rs_scale is not None:   # the encoder norm of a resampled latent, as a share of the live rows' mean
            from safesail.train import resample
            patches.enter_context(mock.patch("safesail.train.trainer.resample_dead",
                                             functools.partial(resample.resample_dead, enc_scale=float(rs_scale))))
        if k_start is not None:   # k falls linearly from k_start to k over the first k_until of the steps
            patches.enter_context(k_anneal_patch(int(k_start), int(g["k"]), k_until))
        if freeze:
            patches.enter_context(freeze_patch(freeze))
        if redundant is not None:
            for p in redundant_patch(float(redundant)):
                patches.enter_context(p)
        if sgd is not None:
            patches.enter_context(sgd_patch(float(sgd.get("momentum", 0.9))))
        with patches:
            [t] = _train(init, train, cfg, opt, pdata, seed)
        dt = time.perf_counter() - t0
        decs.append(t.sae.W_dec)
        if not out:
            with torch.no_grad():
                z = t.sae.encode(held)
                fvu = float((held - t.sae.decode(z)).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
                dead = float(((z > 0).sum(0) == 0).float().mean())
                l0 = float((z > 0).sum(1).float().mean())
            m = t.metrics
            out = {**diagnose(t.sae.W_dec, pdata), "fvu": round(fvu, 4), "l0": round(l0, 2), "dead": round(dead, 4),
                   "train_dead": round(m.get("train_dead_fraction", float("nan")), 4),
                   "init_cos": round(m["decoder_init_cos"], 3), "enc_dec": round(m["enc_dec_cos"], 3),
                   "plateau": round(m.get("fvu_plateau", float("nan")), 3), "lr": round(m["lr"], 5),
                   "steps": m["steps"], "resampled": m.get("resampled", 0), "split": m.get("split", 0),
                   "s": round(dt, 1)}
        else:
            out["mmcs_seeds"] = out.get("mmcs_seeds", [out["mmcs"]]) + [round(mmcs(t.sae.W_dec, pdata.atoms), 4)]
    if len(decs) > 1:
        out["seed_mmcs"] = round(decoder_mmcs(decs[0], decs[1]), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", help="JSON list of settings")
    ap.add_argument("--variant", default="hard", choices=sorted(VARIANTS))
    ap.add_argument("--samples", type=int, default=250_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--knobs", default="{}", help="JSON: generator fields changed from the variant's "
                    "(planted.Variant: noise, power, share, active, mag_low, mag_span, cluster)")
    a = ap.parse_args()
    knobs = json.loads(a.knobs)
    a.pvariant = dataclasses.replace(VARIANTS[a.variant], **knobs) if knobs else a.variant
    torch.set_num_threads(1)
    cache: dict = {}
    for g in json.loads(a.grid):
        row = run_entry(g, a, cache)
        print(json.dumps({"variant": a.variant, **({"knobs": knobs} if knobs else {}), **g, **row}), flush=True)


if __name__ == "__main__":
    main()
