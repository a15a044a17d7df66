"""GPU suite (issue 17): training and caching figures at Safe-SAIL's size, in one JSON, in minutes.

    python benchmarks/gpu_suite.py --out gpu_suite.json                 # one GPU (H100/H200): < 8 min
    python benchmarks/gpu_suite.py --device cpu --small --out s.json    # CI: the same code path in seconds

Measured (random data and a randomly initialised model: no downloads):
1. SAE training tokens/s at 2,048 in, 20,480 latents, 16,384 tokens a step, TopK k = 32 and 200:
   `safesail.train.trainer.train_saes` (forward + backward + AuxK + optimiser + decoder
   renormalisation), batches handed over on the host (pinned, bf16) as the cache reader does;
   `tokens_per_s` over the steps after the first 2 (device synchronised at both ends: SAE
   construction, first-batch init and export excluded), `tokens_per_s_whole_call` with them;
   peak device memory per run.
2. One-pass sweep ratio: 4 TopK SAEs (k 16/32/64/128) in one pass vs 4 separate runs, same data:
   `ratio` over the whole calls (SAE construction included, as a user sees it), `ratio_steady`
   over the steps after the first 2.
3. Cache ratio: a Qwen2.5-3B-shaped model (36 layers, 2,048 hidden, 16/2 heads, 11,008 MLP) in
   bf16, random weights; the cache's forward (hooks on 5 MLP outputs, stop after the last,
   bf16 copy to the host) against a bare forward truncated at the last hooked layer.
`--small` shrinks every size (d 64, 640 latents, 2-layer model) so CI can run it on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

FULL = dict(d=2048, latents=20480, batch=16384, ks=[32, 200], steps=20, sweep_ks=[16, 32, 64, 128], sweep_steps=10,
            model=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936), layers=[0, 8, 17, 26, 35], seq=1024, seqs=8,
            rounds=3)
SMALL = dict(d=64, latents=640, batch=512, ks=[8, 32], steps=3, sweep_ks=[8, 16], sweep_steps=3,
             model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512), layers=[0, 1], seq=64, seqs=2, rounds=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (Linux KiB)


def host_batches(s: dict, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(s["batch"], s["d"], generator=g).to(torch.bfloat16) for _ in range(2)]
    if torch.cuda.is_available():
        pool = [p.pin_memory() for p in pool]
    return [pool[i % len(pool)] for i in range(n)]


WARM_STEPS = 2   # steps of each run not timed in its steady rate (kernel choice, allocator, first-batch init)


def train_rate(s: dict, device: torch.device, ks: list[int], steps: int) -> dict:
    """One `train_saes` run over `steps` host batches: wall time of the whole call (SAE construction,
    first-batch init and export included) and the steady rate of the steps after WARM_STEPS
    (device synchronised at both ends), with the peak device memory."""
    from safesail.train.trainer import TrainOptions, train_saes

    cfgs = [dict(arch="topk", k=k, d_in=s["d"], n_latents=s["latents"]) for k in ks]
    batches = host_batches(s, steps)
    marks: dict[int, float] = {}

    def on_step(done: int) -> None:
        if done in (WARM_STEPS, steps):
            sync(device)
            marks[done] = time.perf_counter()

    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    train_saes(batches, cfgs, TrainOptions(progress=False, log_every=10 ** 9, device=str(device), total_steps=steps),
               on_step=on_step)
    sync(device)
    wall = time.perf_counter() - t0
    timed = steps - WARM_STEPS
    steady = (marks[steps] - marks[WARM_STEPS]) if timed > 0 else float("nan")
    return {"wall_s": wall, "steady_s": steady, "steady_steps": timed, "peak_gib": peak_gib(device),
            "tokens": s["batch"] * steps}


def training(s: dict, device: torch.device) -> dict:
    train_rate(s, device, [s["ks"][0]], WARM_STEPS + 1)  # warm-up: kernels, allocator, the optimiser's lazy imports
    out = {}
    for k in s["ks"]:
        r = train_rate(s, device, [k], s["steps"])
        out[f"k{k}"] = {"tokens_per_s": s["batch"] * r["steady_steps"] / r["steady_s"],
                        "tokens_per_s_whole_call": r["tokens"] / r["wall_s"], "seconds": r["wall_s"],
                        "peak_gib": r["peak_gib"], "tokens": r["tokens"]}
        print(f"train k={k}: {out[f'k{k}']['tokens_per_s']:,.0f} tokens/s in steady steps "
              f"({out[f'k{k}']['tokens_per_s_whole_call']:,.0f} over the whole call), peak {r['peak_gib']} GiB",
              flush=True)
    one = train_rate(s, device, s["sweep_ks"], s["sweep_steps"])
    sep = [train_rate(s, device, [k], s["sweep_steps"]) for k in s["sweep_ks"]]
    out["sweep"] = {"ks": s["sweep_ks"], "one_pass_s": one["wall_s"], "separate_s": sum(r["wall_s"] for r in sep),
                    "ratio": one["wall_s"] / sum(r["wall_s"] for r in sep),
                    "ratio_steady": one["steady_s"] / sum(r["steady_s"] for r in sep)}
    print(f"sweep ratio one pass / separate: {out['sweep']['ratio']:.3f} (whole calls), "
          f"{out['sweep']['ratio_steady']:.3f} (steady steps)", flush=True)
    return out


def caching(s: dict, device: torch.device) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench_cache import truncated_forward
    from safesail.hooks import capture_activations, hook_points

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # built on the device in its dtype: a 3B model initialised on the host in
    try:                             # float32 would take 12 GB of host memory and minutes of CPU
        with torch.device(device):
            model = Qwen2ForCausalLM(Qwen2Config(**s["model"], max_position_embeddings=4096))
    finally:
        torch.set_default_dtype(old_dtype)
    model.eval()
    points = hook_points(s["layers"], "mlp_out", s["model"]["num_hidden_layers"])
    ids = torch.randint(0, s["model"]["vocab_size"], (s["seqs"], s["seq"]), device=device)
    bare = truncated_forward(model, max(p.layer for p in points))

    def cache_fwd():
        with torch.no_grad():
            capture_activations(model, ids, None, points, transform=lambda hp, a: a.to(torch.bfloat16).to("cpu"))

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn(ids) if fn is bare else fn()
        sync(device)
        return ids.numel() / (time.perf_counter() - t0)

    timed(bare), timed(cache_fwd)  # warm-up
    b, c = [], []
    for _ in range(s["rounds"]):
        b.append(timed(bare))
        c.append(timed(cache_fwd))
    out = {"bare_tokens_per_s": statistics.median(b), "cache_tokens_per_s": statistics.median(c),
           "ratio": statistics.median(c) / statistics.median(b), "dtype": str(dtype), "tokens": ids.numel()}
    print(f"cache / bare forward: {out['ratio']:.3f}", flush=True)
    del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (CI on a CPU)")
    ap.add_argument("--out", default="gpu_suite.json")
    a = ap.parse_args()
    device = torch.device(a.device)
    s = SMALL if a.small else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    t0 = time.perf_counter()
    result = {"device": name, "small": a.small, "torch": torch.__version__, "sizes": {k: v for k, v in s.items()},
              "train": training(s, device), "cache": caching(s, device)}
    result["wall_s"] = time.perf_counter() - t0
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
