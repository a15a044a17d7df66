"""Where one SAE training step's time goes, and this tree's training against another tree's, side by side.

    # per part of one TopK step (real activations, AuxK on a given share of dead latents):
    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py parts --cache <activations/layers.14.mlp_out> \\
        --ks 32 64 --batch 4096 --steps 6 --dead 0.06 [--bf16] [--profile]
    # a whole one-pass run (train_saes defaults) here vs another checkout, alternating in fresh processes:
    git archive <commit> safesail | tar -x -C /tmp/base
    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py compare --cache <...> --base /tmp/base \\
        --ks 32 64 --repeats 3 [--bf16]

`parts` times, with a clock around each, the pieces of `SAE.forward_with_loss` + the trainer's step
(batch statistics, encoder product, top-k, sparse decode, loss, AuxK forward/backward, main
backward, parallel-gradient removal, optimiser, decoder renormalisation, figures); `--profile`
adds a torch.profiler table by op. `compare` runs `train_saes` over one pass of the cache (the
`bench_train.py` setting) in a subprocess per side, alternating sides every repeat so a shared
machine's load hits both alike, and reports tokens/s (median) and held-out FVU of each side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def _batches(cache: str, batch: int, steps: int | None):
    from safesail.train.activation_store import ActivationStore

    store = ActivationStore(cache)
    train = list(store.iter_batches(batch, seed=0))
    return store, (train[:steps] if steps else train)


def parts(a) -> None:
    from safesail.saes import SAEConfig, build_sae
    from safesail.train.optim import make_optimizer

    store, xs = _batches(a.cache, a.batch, a.steps)
    xs = [x.float() for x in xs]
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.bf16 else contextlib.nullcontext
    for k in a.ks:
        cfg = SAEConfig(arch="topk", k=k, d_in=store.d, n_latents=a.latents or 10 * store.d).validate()
        sae = build_sae(cfg)
        opt = make_optimizer("signum", sae.parameters(), lr=1e-3)
        dead = torch.rand(cfg.n_latents, generator=torch.Generator().manual_seed(0)) < a.dead
        times: dict[str, list[float]] = {}
        clock = [0.0]

        def mark(name):
            now = time.perf_counter()
            times.setdefault(name, []).append(now - clock[0])
            clock[0] = now

        for x in xs:
            clock[0] = time.perf_counter()
            s1 = torch.cat([x.sum(0, dtype=torch.float64), x.pow(2).sum(dtype=torch.float64).reshape(1)])
            if not torch.isfinite(s1).all():
                raise SystemExit("non-finite activations")
            total_var = (s1[-1] - s1[:-1].pow(2).sum() / x.shape[0]).float()
            mark("batch_stats")
            opt.zero_grad(set_to_none=True)
            with ac():
                x_c = x - sae.b_dec
                with torch.no_grad():
                    pre = F.linear(x_c, sae.W_enc, sae.b_enc)
                mark("encoder_matmul")
                codes = _topk_codes(sae, x_c, pre)
                mark("topk")
                from safesail.saes.sparse_ops import sparse_decode

                recon = sparse_decode(codes.vals, codes.idx, sae.W_dec, codes.pattern) + sae.b_dec
                mark("decoder_fwd")
                e = x - recon.float()
                fvu = e.pow(2).sum() / total_var
                fired = torch.zeros(cfg.n_latents, dtype=torch.bool)
                fired[codes.idx[codes.vals > 0]] = True
                mark("loss_fired")
                aux = sae._auxk(pre, e, dead, total_var, x_c)
                mark("auxk_fwd")
            (cfg.auxk_alpha * aux).backward(retain_graph=True) if aux.requires_grad else None
            mark("auxk_bwd")
            fvu.backward()
            mark("main_bwd")
            sae.remove_parallel_grad()
            mark("remove_parallel")
            opt.step()
            mark("optimizer")
            sae.normalize_decoder()
            mark("decoder_renorm")
            torch.stack([fvu.detach(), aux.detach().float()]).tolist()
            mark("figures")
        med = {p: statistics.median(v[1:] or v) * 1e3 for p, v in times.items()}   # the first step warms up
        total = sum(med.values())
        print(json.dumps({"k": k, "batch": a.batch, "latents": cfg.n_latents, "bf16": a.bf16, "dead": a.dead,
                          "step_ms": round(total, 1), "parts_ms": {p: round(v, 1) for p, v in med.items()},
                          "share": {p: round(v / total, 3) for p, v in med.items()}}), flush=True)
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            from safesail.train.trainer import TrainOptions, train_saes

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_saes(xs, [cfg.to_dict()], TrainOptions(progress=False, log_every=10 ** 9, dead_tokens=2 * a.batch,
                                                             autocast=a.bf16))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


def _topk_codes(sae, x_c, pre):
    """TopK's train_codes given the encoder product already computed (so the two are timed apart)."""
    from safesail.saes.base import TrainCodes
    from safesail.saes.sparse_ops import RowsPattern, gather_preacts

    with torch.no_grad():
        top, idx = pre.topk(sae.cfg.k, dim=1, sorted=False)
    pattern = RowsPattern(idx, sae.cfg.n_latents)
    vals = gather_preacts(x_c.detach(), sae.W_enc, sae.b_enc, idx, top.clone(), b_dec=sae.b_dec,
                          pattern=pattern).relu()
    return TrainCodes(pre=pre, vals=vals, idx=idx, pattern=pattern)


def worker(a) -> None:
    """One side of `compare`: one pass of `train_saes` (its defaults), then held-out FVU; one JSON line."""
    import safesail
    from safesail.train.activation_store import ActivationStore
    from safesail.train.trainer import TrainOptions, train_saes

    store, batches = _batches(a.cache, a.batch, a.steps)
    held = torch.cat(list(ActivationStore(a.cache).iter_batches(2048, split="eval", shuffle=False,
                                                                drop_last=False)))[:4096].float()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)   # torch._dynamo's import: not timed
    cfg = dict(arch="topk", k=a.k, d_in=store.d, n_latents=a.latents or 10 * store.d, seed=0)
    t0 = time.perf_counter()
    [t] = train_saes(batches, [cfg], TrainOptions(progress=False, log_every=10 ** 9, autocast=a.bf16))
    dt = time.perf_counter() - t0
    with torch.no_grad():
        r = t.sae(held)
        fvu = float((held - r).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    tokens = sum(b.shape[0] for b in batches)
    print(json.dumps({"tree": str(Path(safesail.__file__).parents[1]), "k": a.k, "seconds": dt,
                      "tok_s": tokens / dt, "fvu": fvu, "train_dead": t.metrics.get("train_dead_fraction")}))


def compare(a) -> None:
    sides = {"this": str(REPO), "base": a.base}
    rows = []
    for k in a.ks:
        runs = {s: [] for s in sides}
        for rep in range(a.repeats):
            order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
            for side in order:
                cmd = [sys.executable, __file__, "worker", "--cache", a.cache, "--k", str(k), "--batch", str(a.batch)]
                cmd += (["--steps", str(a.steps)] if a.steps else []) + (["--bf16"] if a.bf16 else [])
                cmd += ["--latents", str(a.latents)] if a.latents else []
                env = {**os.environ, "PYTHONPATH": sides[side]}
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                runs[side].append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps({"side": side, **runs[side][-1]}), flush=True)
        row = {"k": k, "bf16": a.bf16}
        for side, rs in runs.items():
            row[f"{side}_tok_s"] = round(statistics.median(r["tok_s"] for r in rs))
            row[f"{side}_fvu"] = round(rs[-1]["fvu"], 4)
        row["ratio"] = round(row["this_tok_s"] / row["base_tok_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("parts", "compare", "worker"):
        p = sub.add_parser(name)
        p.add_argument("--cache", required=True)
        p.add_argument("--batch", type=int, default=4096)
        p.add_argument("--steps", type=int, default=None, help="cap on batches (parts: default 6; else one pass)")
        p.add_argument("--latents", type=int, default=None, help="SAE width (default 10 x d)")
        p.add_argument("--bf16", action="store_true", help="bf16 autocast (train.autocast=true)")
        if name == "worker":
            p.add_argument("--k", type=int, required=True)
        else:
            p.add_argument("--ks", type=int, nargs="+", default=[32, 64])
        if name == "parts":
            p.add_argument("--dead", type=float, default=0.06, help="share of latents treated as dead (AuxK)")
            p.add_argument("--profile", action="store_true")
        if name == "compare":
            p.add_argument("--base", required=True, help="a folder holding another tree's safesail/ package")
            p.add_argument("--repeats", type=int, default=3)
            p.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.cmd == "parts":
        a.steps = a.steps or 6
        parts(a)
    elif a.cmd == "worker":
        worker(a)
    else:
        compare(a)


if __name__ == "__main__":
    main()
