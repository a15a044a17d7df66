"""Where one SAE training step's time goes, and the step now vs the previous AuxK / sparse product.

    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py --cache runs/<name>/activations/layers.14.mlp_out \\
        --ks 32 128 --batch 1024 --steps 20 --repeats 3

For each k: the training step of `train_saes` (TopK, 10 x d_in latents, AuxK on from the start)
timed over `--steps` batches, alternating the current code with the previous one (AuxK as a
masked top-k over all latents, S.T @ x as a COO product), `--repeats` times each, so that a
shared machine's load hits both alike; then a torch.profiler table of the current step by op.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
import warnings

import torch

import safesail.saes.base as base
import safesail.saes.sparse_ops as sparse_ops
from safesail.train.activation_store import ActivationStore
from safesail.train.trainer import TrainOptions, train_saes


def _coo_rows_product(idx, coef, x, n):
    b, k = idx.shape
    rows = torch.arange(b, device=idx.device).repeat_interleave(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), coef.reshape(-1).to(x.dtype), (n, b),
                                    is_coalesced=False, check_invariants=False)
        return torch.sparse.mm(s, x)


def _masked_auxk(self, pre, e, dead_mask, total_var, x_c):
    if dead_mask is None or self.cfg.auxk_alpha <= 0 or int(dead_mask.sum()) == 0:
        return e.new_zeros(())
    num_dead = int(dead_mask.sum())
    k_aux = self.cfg.k_aux or self.cfg.d_in // 2
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)
    top, idx = pre.masked_fill(~dead_mask[None], -math.inf).topk(k_aux, dim=1, sorted=False)
    vals = sparse_ops.gather_preacts(x_c, self.W_enc, self.b_enc, idx, top.clone()).relu()
    e_hat = sparse_ops.sparse_decode(vals, idx, self.W_dec)
    return scale * (e_hat.float() - e.detach()).pow(2).sum() / total_var


@contextlib.contextmanager
def previous_code():
    saved = (sparse_ops.sparse_rows_product, base.SAE._auxk)
    sparse_ops.sparse_rows_product = _coo_rows_product
    base.SAE._auxk = _masked_auxk
    try:
        yield
    finally:
        sparse_ops.sparse_rows_product, base.SAE._auxk = saved


def _run(batches, cfg, dead_tokens):
    t0 = time.perf_counter()
    [t] = train_saes(batches, [cfg], TrainOptions(progress=False, total_steps=len(batches), lr_warmup_steps=1,
                                                  dead_tokens=dead_tokens, log_every=10 ** 9))
    return (time.perf_counter() - t0) / len(batches), t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--ks", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    store = ActivationStore(a.cache)
    it = store.iter_batches(a.batch, seed=0)
    batches = [next(it) for _ in range(a.steps)]
    for k in a.ks:
        cfg = {"arch": "topk", "k": k, "d_in": store.d, "n_latents": 10 * store.d}
        dead_tokens = 2 * a.batch   # AuxK from the third step on, as in a short run
        now, before = [], []
        _run(batches[:3], cfg, dead_tokens)   # warm-up (allocations, first-call costs)
        for _ in range(a.repeats):
            now.append(_run(batches, cfg, dead_tokens)[0])
            with previous_code():
                before.append(_run(batches, cfg, dead_tokens)[0])
        _, t = _run(batches[:4], cfg, dead_tokens)   # AuxK on at step 3: sums in another order, same weights
        with previous_code():
            _, t_old = _run(batches[:4], cfg, dead_tokens)
        same = float((t.sae.W_dec - t_old.sae.W_dec).abs().max().detach())
        row = {"k": k, "batch": a.batch, "steps": a.steps, "step_s_now": round(statistics.median(now), 4),
               "step_s_before": round(statistics.median(before), 4),
               "ratio": round(statistics.median(now) / statistics.median(before), 3),
               "tokens_per_s_now": round(a.batch / statistics.median(now)), "one_step_max_weight_diff": same,
               "runs_now": [round(v, 4) for v in now], "runs_before": [round(v, 4) for v in before]}
        print(json.dumps(row), flush=True)
        if not a.no_profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                _run(batches, cfg, dead_tokens)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
