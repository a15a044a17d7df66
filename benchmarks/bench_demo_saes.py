"""The demo's SAE quality target (issue 13): held-out FVU and CE loss recovered, per hook, per setting.

    OMP_NUM_THREADS=1 python benchmarks/bench_demo_saes.py --run /tmp/train/runs/demo \\
        --hooks layers.14.mlp_out,layers.7.mlp_out \\
        '[{"k": 128, "epochs": 2, "batch": 1024}, {"k": 256, "epochs": 2, "batch": 1024}]'

Reads the run's activation cache (`safesail cache experiment=demo`), trains each setting with
`train_saes` exactly as the train stage would (same shuffling, warmup cap, options), then
evaluates FVU / L0 / dead fraction on every held-out row and CE loss recovered (with its
jackknife standard error) on every held-out window (`--ce-windows` to cap). An entry is an SAE
config (arch topk unless given; `n` = width, default 10 x d_in) plus `epochs`, `batch` and an
`opt` object of TrainOptions. One JSON line per (hook, setting), with the training seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from omegaconf import OmegaConf

from safesail.train.activation_store import ActivationStore
from safesail.train.evaluate import evaluate_ce, evaluate_reconstruction
from safesail.train.trainer import TrainOptions, train_saes


def _batches(store: ActivationStore, batch: int, epochs: int, seed: int = 0):
    for e in range(epochs):
        yield from store.iter_batches(batch, seed=seed + e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", help="JSON list of settings")
    ap.add_argument("--run", required=True, help="run directory holding activations/<hook>")
    ap.add_argument("--hooks", default=",".join(f"layers.{i}.mlp_out" for i in (0, 7, 14, 21, 29)),
                    help="comma-separated hook names")
    ap.add_argument("--ce-windows", type=int, default=0, help="held-out windows for CE (0: all)")
    ap.add_argument("--no-ce", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    grid = json.loads(a.grid)
    loaded = None
    if not a.no_ce:
        from safesail.models import load_model

        run_cfg = OmegaConf.load(f"{a.run}/config.yaml")
        loaded = load_model(run_cfg.model, "cpu", cache_dir=run_cfg.get("cache_dir"))
    for hook in a.hooks.split(","):
        store = ActivationStore(f"{a.run}/activations/{hook}")
        trained, rows = [], []
        for g in grid:
            g = dict(g)
            epochs, batch = int(g.pop("epochs", 1)), int(g.pop("batch", 4096))
            steps = store.num_batches(batch) * epochs
            opt = {"progress": False, "log_every": 10 ** 9, "total_steps": steps, "max_steps": steps,
                   "lr_warmup_steps": min(1000, max(1, steps // 10)), **g.pop("opt", {})}
            cfg = {"arch": "topk", "d_in": store.d, "n_latents": g.pop("n", 10 * store.d), "hook": hook, **g}
            t0 = time.perf_counter()
            [t] = train_saes(list(_batches(store, batch, epochs)), [cfg], TrainOptions(**opt))
            dt = time.perf_counter() - t0
            [rec] = evaluate_reconstruction([t.sae], store.iter_batches(4096, shuffle=False, split="eval",
                                                                        drop_last=False))
            trained.append(t.sae)
            rows.append({"hook": hook, **g, "n": cfg["n_latents"], "epochs": epochs, "batch": batch,
                         **{k: v for k, v in opt.items() if k not in ("progress", "log_every")},
                         "train_s": round(dt, 1), "fvu": round(rec["fvu"], 4), "l0": round(rec["l0"], 1),
                         "dead": round(rec["dead_fraction"], 4), "dense": round(rec["dense_fraction"], 4),
                         "decoder_init_cos": round(t.metrics["decoder_init_cos"], 3)})
            if loaded is None:
                print(json.dumps(rows[-1]), flush=True)
        if loaded is None:
            continue
        t1 = time.perf_counter()   # one CE pass for all settings of the hook: clean and zero-ablated shared
        ces = evaluate_ce(loaded.model, loaded.tokenizer, hook, trained, store.iter_token_windows("eval"),
                          batch_size=4, max_tokens=a.ce_windows * store.ctx_len or None, progress=False)
        ce_s = round(time.perf_counter() - t1, 1)
        for row, ce in zip(rows, ces):
            row.update(ce_recovered=round(ce["ce_loss_recovered"], 4), ce_se=round(ce["ce_loss_recovered_se"], 4),
                       kl=round(ce["kl_to_clean"], 4), ce_tokens=ce["ce_tokens"],
                       ce_denom=round(ce["ce_loss_zero_ablation"] - ce["ce_loss_clean"], 4), ce_s=ce_s)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
