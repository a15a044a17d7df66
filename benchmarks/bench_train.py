"""Benchmark: SAE training quality and speed against EleutherAI sparsify, and the one-pass sweep.

    python benchmarks/bench_train.py --cache runs/<name>/activations/layers.14.mlp_out   # real activations
    python benchmarks/bench_train.py --planted easy --samples 250000 --batch 1024       # planted dictionary
    python benchmarks/bench_train.py --cache ... --sweep-only                            # just the sweep ratio

Training sides, interleaved per repeat so machine load hits all alike (same data, width, k):
- `ours`: `train_saes` with its defaults (the recipe of docs/training.md);
- `sparsify-default`: sparsify's own training step with its defaults: `SparseCoder`, b_dec at the
  first batch's mean, schedule-free SignSGD (momentum 0.95, lr 5e-3/sqrt(n/2^14)), FVU loss,
  decoder renormalised before each forward, parallel gradient removed, no AuxK, weights
  read back with `opt.eval()`;
- `sparsify-adam`: the same with Adam at 8x its Adam rule (2e-4/sqrt(n/2^14)), the better of
  the two Adam settings measured (issue 17);
- `ours-bf16` (with `--ours-bf16`): ours under bf16 autocast (`train.autocast=true`), on CPU too.
Reported per side: held-out FVU, dead fraction (latents that never fire on the held-out rows),
tokens/s (median over repeats); planted data also MMCS to the true atoms; ours also the
learned-nothing signals, and with `--seed-check` `seed_mmcs` (its decoder against a seed+1 run's).

Sweep: 4 TopK SAEs (k 16/32/64/128) trained in one pass reading the on-disk cache, with the
SAE steps on `--sae-threads` threads, against 4 separate runs (each reading the cache) at the
same torch thread count; the ratio one-pass / separate is the figure (target <= 0.85 on CPU).

Memory (`--memory`): peak RSS of `train_saes` with 1 and 4 TopK SAEs (`--memory-steps` batches,
each count in a fresh process), the increase per extra SAE against the formula of
safesail/train/memory.py, and the tensors each training state holds after a step.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import time

from pathlib import Path

import torch


def load_data(args):
    if args.planted:
        from safesail.train.planted import PlantedData

        pdata = PlantedData(args.planted, seed=args.seed)
        return pdata.batches(args.batch, args.samples), pdata.sample(4096), pdata.atoms
    from safesail.train.activation_store import ActivationStore

    store = ActivationStore(args.cache)
    train = list(store.iter_batches(args.batch, seed=0))
    if args.steps:
        train = train[: args.steps]
    held = torch.cat(list(store.iter_batches(2048, split="eval", shuffle=False, drop_last=False)))[:4096]
    return train, held, None


def evaluate(encode, decode, x: torch.Tensor, w_dec: torch.Tensor, atoms) -> dict:
    with torch.no_grad():
        z = encode(x)
        r = decode(z)
        out = {"fvu": float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
               "dead": float(((z > 0).sum(0) == 0).float().mean())}
    if atoms is not None:
        from safesail.train.planted import mmcs

        out["mmcs"] = mmcs(w_dec, atoms)
    return out


def run_ours(batches, n, k, args, autocast: str | bool = "auto"):
    from safesail.train.trainer import TrainOptions, train_saes

    t0 = time.perf_counter()
    [t] = train_saes(batches, [dict(arch="topk", k=k, d_in=batches[0].shape[1], n_latents=n, seed=args.seed)],
                     TrainOptions(progress=False, log_every=10 ** 9, device=args.device, autocast=autocast))
    dt = time.perf_counter() - t0
    sae = t.sae.to(args.device)
    return dt, sae.encode, sae.decode, sae.W_dec, t.metrics


def run_sparsify(batches, n, k, args, optimizer: str):
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(args.seed)
    sae = SparseCoder(batches[0].shape[1], SparseCoderConfig(num_latents=n, k=k), device=args.device)
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper

        opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=5e-3 / (n / 2 ** 14) ** 0.5), momentum=0.95)
        opt.train()
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=8 * 2e-4 / (n / 2 ** 14) ** 0.5)
    t0 = time.perf_counter()
    with torch.no_grad():
        sae.b_dec.copy_(batches[0].float().mean(0))
    for x in batches:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    if optimizer == "signum":
        opt.eval()
    dt = time.perf_counter() - t0

    def encode(x):
        e = sae.encode(x)
        return torch.zeros(x.shape[0], n, device=x.device).scatter_(1, e.top_indices, e.top_acts)

    return dt, encode, lambda z: z @ sae.W_dec + sae.b_dec, sae.W_dec, {}


def compare(args) -> list[dict]:
    batches, held, atoms = load_data(args)
    tokens = sum(b.shape[0] for b in batches)
    rows = []
    sides = {"ours": lambda k: run_ours(batches, args.latents, k, args),
             "sparsify-default": lambda k: run_sparsify(batches, args.latents, k, args, "signum"),
             "sparsify-adam": lambda k: run_sparsify(batches, args.latents, k, args, "adam")}
    if args.ours_bf16:   # train.autocast=true: bf16 autocast also on CPU (native bf16 matmul on AVX512-BF16/AMX)
        sides["ours-bf16"] = lambda k: run_ours(batches, args.latents, k, args, autocast=True)
    for k in args.ks:
        times = {s: [] for s in sides}
        figs = {}
        for _ in range(args.repeats):
            for side, fn in sides.items():
                dt, enc, dec, w_dec, metrics = fn(k)
                times[side].append(dt)
                figs[side] = evaluate(enc, dec, held, w_dec, atoms)
                if metrics:
                    figs[side].update({m: metrics.get(m) for m in ("decoder_init_cos", "enc_dec_cos", "fvu_plateau")})
                    figs[side]["_w_dec"] = w_dec.detach().cpu()
        if args.seed_check:  # latent stability: the same recipe from another seed
            from safesail.train.signals import decoder_mmcs

            other = argparse.Namespace(**{**vars(args), "seed": args.seed + 1})
            w_other = run_ours(batches, args.latents, k, other)[3]
            figs["ours"]["seed_mmcs"] = decoder_mmcs(figs["ours"].pop("_w_dec"), w_other)
        for side in sides:
            figs[side].pop("_w_dec", None)
            row = {"k": k, "side": side, "tokens": tokens, "tok_s": tokens / statistics.median(times[side]),
                   **figs[side]}
            rows.append(row)
            print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in row.items()}), flush=True)
    return rows


def sweep_ratio(args) -> dict:
    from safesail.train.activation_store import ActivationStore
    from safesail.train.trainer import TrainOptions, train_saes

    store = ActivationStore(args.cache)
    steps = args.sweep_steps

    def source(start_batch=0):
        return itertools.islice(store.iter_batches(args.batch, seed=0, start_batch=start_batch), steps - start_batch)

    cfgs = [dict(arch="topk", k=k, d_in=store.d, n_latents=args.latents) for k in args.sweep_ks]
    base = dict(progress=False, log_every=10 ** 9, total_steps=steps, device=args.device)
    res = {"ks": args.sweep_ks, "steps": steps, "batch": args.batch, "torch_threads": torch.get_num_threads(),
           "sae_threads": args.sae_threads, "one_pass_s": [], "separate_s": []}
    for _ in range(args.sweep_repeats):  # alternating
        t0 = time.perf_counter()
        out = train_saes(source, cfgs, TrainOptions(sae_threads=args.sae_threads, **base))
        res["one_pass_s"].append(time.perf_counter() - t0)
        res["profile"] = out[0].metrics["profile"]
        t0 = time.perf_counter()
        for c in cfgs:
            train_saes(source, [c], TrainOptions(**base))
        res["separate_s"].append(time.perf_counter() - t0)
    res["ratio"] = statistics.median(res["one_pass_s"]) / statistics.median(res["separate_s"])
    print(json.dumps(res), flush=True)
    return res


def memory_worker(args) -> None:
    """One process: read the batches, train `--memory-worker` SAEs, print peak RSS before/after (MiB)."""
    import resource

    from safesail.saes import SAEConfig
    from safesail.train.activation_store import ActivationStore
    from safesail.train.distributed import DistContext
    from safesail.train.trainer import SAETrainState, TrainOptions, train_saes
    try:
        from safesail.train.memory import held_bytes, train_peak_bytes
    except ImportError:   # a tree from before safesail/train/memory.py (--memory-tree)
        held_bytes = train_peak_bytes = None

    def rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    store = ActivationStore(args.cache)
    batches = list(itertools.islice(store.iter_batches(args.batch, seed=0), args.memory_steps))
    ks = args.sweep_ks[: args.memory_worker]
    cfgs = [dict(arch="topk", k=k, d_in=store.d, n_latents=args.latents) for k in ks]
    opts = TrainOptions(progress=False, log_every=10 ** 9, total_steps=len(batches), autocast=args.ours_bf16)
    before = rss_mib()   # data read; nothing trained yet
    train_saes(batches, cfgs, opts)
    peak = rss_mib()
    row = {"saes": len(cfgs), "steps": len(batches), "batch": args.batch, "rss_before_mib": round(before, 1),
           "peak_rss_mib": round(peak, 1)}
    if held_bytes is not None:
        st = SAETrainState(SAEConfig.from_dict(cfgs[0]).validate(), opts, torch.device("cpu"))  # one state, one step
        x = batches[0].float()
        st.train_step(x, ((x - x.mean(0)).pow(2).sum(), x.shape[0]), DistContext(device=torch.device("cpu")),
                      contextlib.nullcontext)
        row["held_after_step_mib"] = {k: round(v / 2 ** 20, 2) for k, v in held_bytes(st.sae, st.opt).items()}
        row["formula_sae_part_mib"] = round(train_peak_bytes(args.latents, store.d, len(cfgs), args.batch, max(ks),
                                                             bf16=bool(args.ours_bf16)) / 2 ** 20, 1)
    print(json.dumps(row), flush=True)


def memory(args) -> dict:
    import subprocess
    import sys

    rows = []
    for n in (1, 4):
        cmd = [sys.executable, __file__, "--cache", args.cache, "--memory-worker", str(n), "--batch", str(args.batch),
               "--memory-steps", str(args.memory_steps), "--latents", str(args.latents)]
        cmd += ["--ours-bf16"] if args.ours_bf16 else []
        env = {**os.environ, **({"PYTHONPATH": args.memory_tree} if args.memory_tree else {})}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    per = (rows[1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]) / 3
    res = {"runs": rows, "per_extra_sae_mib": round(per, 1)}
    print(json.dumps({"per_extra_sae_mib": res["per_extra_sae_mib"]}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="an activation cache folder (runs/<name>/activations/<hook>)")
    ap.add_argument("--planted", default=None, help="a planted-dictionary variant: easy | hard | hard2")
    ap.add_argument("--samples", type=int, default=250_000, help="planted: training rows")
    ap.add_argument("--latents", type=int, default=None, help="SAE width (default: 10 x d, or the atom count)")
    ap.add_argument("--ks", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=None, help="cap on training batches (default: one pass)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed-check", action="store_true", help="also train ours from seed+1: decoder MMCS between the two")
    ap.add_argument("--ours-bf16", action="store_true", help="also ours with bf16 autocast (train.autocast=true)")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-ks", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--sweep-steps", type=int, default=4)
    ap.add_argument("--sweep-repeats", type=int, default=1)
    ap.add_argument("--sae-threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="peak RSS of 1 vs 4 SAEs (fresh processes) and the formula")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-tree", default=None, help="--memory: run the workers on another tree's safesail/ (PYTHONPATH)")
    ap.add_argument("--memory-worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not (args.cache or args.planted):
        ap.error("give --cache <activation folder> or --planted <variant>")
    if args.latents is None:
        if args.planted:
            from safesail.train.planted import VARIANTS

            args.latents = VARIANTS[args.planted].n_atoms
        else:
            from safesail.train.activation_store import ActivationStore

            args.latents = 10 * ActivationStore(args.cache).d
    if args.memory_worker:
        return memory_worker(args)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # the first optimiser imports torch._dynamo (~7 s): not timed
    if args.memory:
        results = {"memory": memory(args)}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return
    results = {"device": args.device, "torch_threads": torch.get_num_threads(), "data": args.cache or args.planted,
               "latents": args.latents, "batch": args.batch}
    if not args.sweep_only:
        results["rows"] = compare(args)
    if args.cache and not args.no_sweep:
        results["sweep"] = sweep_ratio(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
