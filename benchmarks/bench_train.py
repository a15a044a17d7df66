"""Benchmark: SAE training throughput against EleutherAI sparsify, and a one-pass sweep against separate runs.

    python benchmarks/bench_train.py                      # CPU: d=576, 5,760 latents, k in {32, 64}
    python benchmarks/bench_train.py --cache runs/demo/activations/layers.14.mlp_out
    python benchmarks/bench_train.py --device cuda --d 2048 --latents 20480 --ks 32 200 --batch 16384

Both trainers get the same activations (a real cache when --cache is given, else random
heavy-tailed vectors), the same width, k, batch, Adam and learning rate, side by side in
one process, interleaved so machine load hits both alike. sparsify's step is the one its
trainer runs: `SparseCoder.forward` (fused encoder + its decoder, bf16 autocast on CUDA),
FVU loss, parallel-gradient removal, Adam, decoder renormalisation. Reported: tokens/s per
SAE (median of --repeats) and the FVU each reaches on held-out rows after the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def make_data(args) -> tuple[list[torch.Tensor], torch.Tensor]:
    n_rows = args.batch * args.steps
    if args.cache:
        from safesail.train.activation_store import ActivationStore

        store = ActivationStore(args.cache)
        train = list(store.iter_batches(args.batch, seed=0))[: args.steps]
        held = torch.cat(list(store.iter_batches(2048, split="eval", shuffle=False, drop_last=False)))[:4096]
        if len(train) < args.steps:
            train = (train * (args.steps // max(1, len(train)) + 1))[: args.steps]
        return [t.to(args.device) for t in train], held.to(args.device)
    g = torch.Generator().manual_seed(0)
    # sparse heavy-tailed mixture of directions + noise: roughly activation-like
    atoms = torch.randn(4 * args.d, args.d, generator=g)
    def rows(n):
        codes = torch.rand(n, atoms.shape[0], generator=g).pow(12) * 3
        return codes @ atoms / 8 + 0.1 * torch.randn(n, args.d, generator=g)
    x = rows(n_rows + 4096)
    return [b.to(args.device) for b in x[:n_rows].split(args.batch)], x[n_rows:].to(args.device)


def fvu(encode_decode, x: torch.Tensor) -> float:
    with torch.no_grad():
        r = encode_decode(x)
        return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def run_ours(batches, d, n, k, lr, device):
    from safesail.train.trainer import TrainOptions, train_saes

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    [t] = train_saes(batches, [dict(arch="topk", k=k, d_in=d, n_latents=n, lr=lr, b_dec_init="mean", auxk_alpha=0)],
                     TrainOptions(lr_warmup_steps=1, lr_decay_fraction=0, progress=False, device=device, log_every=10**9))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, t.sae.to(device)


def run_sparsify(batches, d, n, k, lr, device):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        sae.b_dec.copy_(batches[0].float().mean(0))
    for x in batches:
        out = sae(x)
        opt.zero_grad(set_to_none=True)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0

    def recon(x):
        return sae(x).sae_out
    return dt, recon


def store_batches(cache: str, batch: int, steps: int):
    """A fresh pass over the on-disk cache for each run: what `safesail train` pays per pass
    (shard reads, bf16 -> fp32, shuffle), so the one-pass sweep's shared read shows."""
    import itertools

    from safesail.train.activation_store import ActivationStore

    store = ActivationStore(cache)
    return lambda start_batch=0: itertools.islice(store.iter_batches(batch, seed=0, start_batch=start_batch), steps)


def sweep_ratio(batches, d, n, ks, lr, device, steps=None):
    from safesail.train.trainer import TrainOptions, train_saes

    cfgs = [dict(arch="topk", k=k, d_in=d, n_latents=n, lr=lr, auxk_alpha=0) for k in ks]
    opts = TrainOptions(lr_warmup_steps=1, progress=False, device=device, log_every=10**9,
                        total_steps=None if not callable(batches) else steps)
    t0 = time.perf_counter()
    train_saes(batches, cfgs, opts)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in cfgs:
        train_saes(batches, [c], opts)
    sep = time.perf_counter() - t0
    return one, sep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--latents", type=int, default=5760)
    ap.add_argument("--ks", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=None, help="an activation cache folder (runs/<name>/activations/<hook>)")
    ap.add_argument("--sweep-ks", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--sweep-steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches, held = make_data(args)
    d, n = batches[0].shape[1], args.latents
    lr = 2e-4 / (n / 2 ** 14) ** 0.5 * 4  # same for both; a little higher than the default for few steps
    tokens = args.batch * args.steps
    results = {"device": args.device, "d": d, "latents": n, "batch": args.batch, "steps": args.steps,
               "threads": torch.get_num_threads(), "data": args.cache or "random", "rows": []}
    for k in args.ks:
        t_ours, t_theirs, f_ours, f_theirs = [], [], None, None
        for _ in range(args.repeats):  # interleaved
            dt, sae = run_ours(batches, d, n, k, lr, args.device)
            t_ours.append(dt)
            f_ours = fvu(sae, held)
            dt, recon = run_sparsify(batches, d, n, k, lr, args.device)
            t_theirs.append(dt)
            f_theirs = fvu(recon, held)
        row = {"k": k, "ours_tok_s": tokens / statistics.median(t_ours),
               "sparsify_tok_s": tokens / statistics.median(t_theirs), "ours_fvu": f_ours, "sparsify_fvu": f_theirs}
        row["speedup"] = row["ours_tok_s"] / row["sparsify_tok_s"]
        results["rows"].append(row)
        print(f"k={k:4d}  ours {row['ours_tok_s']:10.0f} tok/s  sparsify {row['sparsify_tok_s']:10.0f} tok/s  "
              f"ratio {row['speedup']:.2f}x  FVU after {tokens} tokens: ours {f_ours:.4f} sparsify {f_theirs:.4f}",
              flush=True)
    sb = store_batches(args.cache, args.batch, args.sweep_steps) if args.cache else batches[: args.sweep_steps]
    one, sep = sweep_ratio(sb, d, n, args.sweep_ks, lr, args.device, args.sweep_steps)
    results["sweep"] = {"ks": args.sweep_ks, "one_pass_s": one, "separate_s": sep, "ratio": one / sep,
                        "tokens": args.batch * args.sweep_steps, "sweep_data": "store" if args.cache else "memory"}
    print(f"sweep of {len(args.sweep_ks)} TopK SAEs (k={args.sweep_ks}) over {args.batch * args.sweep_steps} tokens: one pass "
          f"{one:.1f} s, {len(args.sweep_ks)} separate runs {sep:.1f} s, ratio {one / sep:.2f}")
    if args.device.startswith("cuda"):
        results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        print(f"peak GPU memory {results['peak_memory_gib']:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
