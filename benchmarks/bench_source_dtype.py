"""Source model in float32 vs bfloat16 on CPU: forward speed, LM loss and how much the hooked activations move.

    python benchmarks/bench_source_dtype.py                    # embedded default (SmolLM2-135M), CPU
    python benchmarks/bench_source_dtype.py --tokens 4096 --rounds 3 --threads 1

Both copies of the model run the same packed windows of the configured corpus, alternating
(float32, bfloat16, float32, ...) so that load from other jobs hits both alike; the figure is
the ratio of median tokens/s of the stages' hooked forward (`capture_activations`). The
precision side: the mean next-token loss of each copy on those windows, and per hook the
squared error of the bfloat16 activations against the float32 ones as a fraction of the
float32 activations' variance (an "FVU" of the dtype change, to set beside an SAE's FVU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per timed pass (whole windows)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating float32/bfloat16 rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for `safesail cache`")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from safesail.config import compose
    from safesail.corpus import iter_documents, pack_windows
    from safesail.hooks import capture_activations, hook_points
    from safesail.models import load_model

    dtypes = ("float32", "bfloat16")
    cfgs = {dt: compose(["device=cpu", f"model.dtype={dt}", *a.overrides]) for dt in dtypes}
    lms = {dt: load_model(c.model, c.device, cache_dir=c.cache_dir) for dt, c in cfgs.items()}
    cfg, lm0 = cfgs["float32"], lms["float32"]
    points = hook_points(cfg.model.layers, cfg.model.hook_site, lm0.num_layers)
    ctx, bs = int(cfg.data.ctx_len), int(cfg.cache.batch_size)
    windows = list(pack_windows(iter_documents(cfg.data, lm0.tokenizer, cfg.model.system_prompt), lm0.tokenizer,
                                ctx, a.tokens))
    batches = [torch.tensor([w.input_ids for w in windows[i:i + bs]]) for i in range(0, len(windows), bs)]
    n_tok = len(windows) * ctx

    def hooked_pass(lm) -> dict[str, torch.Tensor]:
        acts: dict[str, list[torch.Tensor]] = {p.name: [] for p in points}
        with torch.inference_mode():
            for ids in batches:
                got = capture_activations(lm.model, ids, None, points)
                for name, x in got.items():
                    acts[name].append(x.float().flatten(0, 1))
        return {k: torch.cat(v) for k, v in acts.items()}

    def loss(lm) -> float:
        total, n = 0.0, 0
        with torch.inference_mode():
            for ids in batches:
                out = lm.model(input_ids=ids, labels=ids)
                total += float(out.loss) * ids.numel()
                n += ids.numel()
        return total / n

    hooked_pass(lms["bfloat16"])  # warm-up
    rates: dict[str, list[float]] = {dt: [] for dt in dtypes}
    acts: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(a.rounds):
        for dt in dtypes:
            t = time.perf_counter()
            acts[dt] = hooked_pass(lms[dt])
            rates[dt].append(n_tok / (time.perf_counter() - t))
    med = {dt: statistics.median(r) for dt, r in rates.items()}
    print(f"model {lm0.name}; {len(windows)} windows x {ctx} tokens, batch {bs}; torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for dt in dtypes:
        print(f"{dt}: hooked forward " + ", ".join(f"{r:.0f}" for r in rates[dt]) + f" tok/s (median {med[dt]:.0f})")
    print(f"RATIO bfloat16/float32 tokens/s = {med['bfloat16'] / med['float32']:.2f}")
    print("mean next-token loss: " + ", ".join(f"{dt} {loss(lms[dt]):.4f}" for dt in dtypes))
    for p in points:
        x, y = acts["float32"][p.name], acts["bfloat16"][p.name]
        fvu = float(((x - y) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        print(f"{p.name}: FVU of the dtype change {fvu:.5f}")


if __name__ == "__main__":
    main()
