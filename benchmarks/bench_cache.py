"""Caching throughput vs. a bare forward pass of the same model truncated at the last hooked layer.

    python benchmarks/bench_cache.py                       # embedded default (SmolLM2-135M), CPU
    python benchmarks/bench_cache.py experiment=smoke      # tiny model
    python benchmarks/bench_cache.py --tokens 8192 --rounds 5 device=cuda cache.batch_size=32

Both sides run on the same packed windows of the configured corpus, alternating
(bare, cache, bare, cache, ...) so that load from other jobs hits both alike;
the figure is the ratio of median tokens/s. The cache side is the stage's own
loop (`_cache_windows`): forward with hooks that stop after the last hooked layer,
conversion to the stored dtype, special-token mask, and shard writes to disk on
the background writer. Peak RSS is measured on a full `safesail cache` run in a
child process (model load, corpus, caching, finalising).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def truncated_forward(model, last_layer: int):
    """A bare forward of the decoder up to and including `last_layer` (no hooks, no LM head)."""
    from safesail.hooks import decoder_layers

    layers = decoder_layers(model)
    base = model.model
    keep = torch.nn.ModuleList(list(layers)[:last_layer + 1])

    def run(ids: torch.Tensor) -> None:
        full = base.layers
        base.layers = keep
        try:
            with torch.no_grad():
                base(input_ids=ids, use_cache=False)
        finally:
            base.layers = full

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per timed pass (whole windows)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating bare/cache rounds")
    ap.add_argument("--no-rss", action="store_true", help="skip the child-process peak-RSS run")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for `safesail cache`")
    a = ap.parse_args()

    from safesail.config import compose
    from safesail.corpus import iter_documents, pack_windows
    from safesail.hooks import capture_activations, hook_points, special_token_mask
    from safesail.models import load_model
    from safesail.train.cache import _cache_windows, store_dtype

    cfg = compose(["device=cpu", *a.overrides])
    lm = load_model(cfg.model, cfg.device, cache_dir=cfg.cache_dir)
    points = hook_points(cfg.model.layers, cfg.model.hook_site, lm.num_layers)
    ctx = int(cfg.data.ctx_len)
    windows = list(pack_windows(iter_documents(cfg.data, lm.tokenizer, cfg.model.system_prompt), lm.tokenizer,
                                ctx, a.tokens))
    n_tok = len(windows) * ctx
    bs = int(cfg.cache.batch_size)
    dtype = store_dtype(cfg.cache.dtype)
    bare = truncated_forward(lm.model, max(p.layer for p in points))
    batches = [torch.tensor([w.input_ids for w in windows[i:i + bs]]).to(lm.device)
               for i in range(0, len(windows), bs)]

    def sync():
        if lm.device.type == "cuda":
            torch.cuda.synchronize()

    def time_bare() -> float:
        sync()
        t = time.perf_counter()
        for ids in batches:
            bare(ids)
        sync()
        return n_tok / (time.perf_counter() - t)

    def time_cache() -> float:
        tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
        folders = {p.name: tmp / p.name for p in points}
        for f in folders.values():
            f.mkdir()
        sync()
        t = time.perf_counter()
        _cache_windows(lm, points, folders, {p.name: set() for p in points}, iter(windows), 0, 1, bs, dtype,
                       capture_activations, special_token_mask)
        sync()
        rate = n_tok / (time.perf_counter() - t)
        written = sum(f.stat().st_size for f in tmp.rglob("*.safetensors"))
        shutil.rmtree(tmp)
        time_cache.written = written  # type: ignore[attr-defined]
        return rate

    time_bare()  # warm-up (allocator, kernels)
    bare_rates, cache_rates = [], []
    for _ in range(a.rounds):
        bare_rates.append(time_bare())
        cache_rates.append(time_cache())
    b, c = statistics.median(bare_rates), statistics.median(cache_rates)
    print(f"model {lm.name} on {lm.device}, {lm.dtype}; hooks {[p.name for p in points]}; "
          f"{len(windows)} windows x {ctx} tokens, batch {bs} windows, stored as {dtype}")
    print(f"bare forward to layer {max(p.layer for p in points)}: " + ", ".join(f"{r:.0f}" for r in bare_rates)
          + f" tok/s (median {b:.0f})")
    print("cache (forward + hooks + writes): " + ", ".join(f"{r:.0f}" for r in cache_rates)
          + f" tok/s (median {c:.0f}); {time_cache.written / 2**20:.1f} MiB written per pass")  # type: ignore
    print(f"RATIO cache/bare = {c / b:.3f}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch threads "
          f"{torch.get_num_threads()}")

    if not a.no_rss:
        root = Path(tempfile.mkdtemp(prefix="bench-cache-run-"))
        cmd = [sys.executable, "-m", "safesail", "cache", f"run.root={root}", "device=cpu",
               f"data.max_tokens={a.tokens}", *a.overrides]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        shutil.rmtree(root)
        print(f"full `safesail cache` run ({n_tok} tokens, incl. start-up and model load): {wall:.1f} s, "
              f"peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
