"""What checking the activation cache's shards costs (issue 16 item 3): opening a cache and the
"already done" check now read every shard's safetensors header and compare its size with the
progress log. Measured side by side with the old check (the file exists) and with one pass of
the trainer's reader over the same cache, on a real cache written by `safesail cache` (tiny model).

    python benchmarks/bench_cache_verify.py [--tokens 131072] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from safesail.config import compose
    from safesail.train import cache_shards
    from safesail.train.activation_store import ActivationStore
    from safesail.train.cache import run_cache_stage

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["experiment=smoke", f"run.root={tmp}", "device=cpu", f"data.max_tokens={args.tokens}",
                       "cache.batch_size=8"])
        run_cache_stage(cfg, [])
        folder = Path(tmp) / "smoke" / "activations" / "layers.1.mlp_out"
        store = ActivationStore(folder)
        n = len(store.meta["shards"])

        def old_open():  # what the reader checked before: meta.json parsed, every shard exists
            s = ActivationStore.__new__(ActivationStore)
            s.folder = folder
            import json

            meta = json.loads((folder / "meta.json").read_text())
            assert all((folder / sh["file"]).exists() for sh in meta["shards"])

        t_old = best_of(old_open, args.repeats)
        t_new = best_of(lambda: ActivationStore(folder), args.repeats)
        t_done = best_of(lambda: cache_shards.cache_intact(folder), args.repeats)
        t_pass = best_of(lambda: sum(b.shape[0] for b in store.iter_batches(4096, shuffle=True)), 1)
        print(f"cache: {store.num_tokens:,} tokens, {n} shards of layers.1.mlp_out (d={store.d})")
        print(f"open, old check (exists):      {t_old * 1e3:8.2f} ms")
        print(f"open, new check (size+header): {t_new * 1e3:8.2f} ms  ({(t_new - t_old) / n * 1e6:.1f} us per shard)")
        print(f"'already done' check:          {t_done * 1e3:8.2f} ms")
        print(f"one shuffled pass of the reader: {t_pass * 1e3:8.1f} ms; the new check is "
              f"{100 * (t_new - t_old) / t_pass:.2f}% of it")


if __name__ == "__main__":
    main()
