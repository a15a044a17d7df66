"""Benchmark of the explain stage with the local default explainer (SmolLM2-135M-Instruct on CPU).

Needs a run directory that `safesail collect` has finished (e.g. the smoke pipeline:
`safesail cache experiment=smoke run.root=/tmp/bench_runs device=cpu`, then train, select, collect).
Copies its latents/ into fresh scratch run directories and explains the first N latents:

  A. baseline: one latent at a time, generate() batch size 1, empty response cache
  B. concurrent: explain.concurrency=4, batch size 4, empty response cache
  C. B again with its cache kept and the explanations deleted (a re-run after losing the outputs)

Prints latents/hour, LLM calls and prompt tokens per latent, the cache hit rate of C,
and the ratios B/A and C/B, as JSON.

    python benchmarks/bench_explain.py --run-dir /tmp/bench_runs/smoke --latents 12
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a run directory with latents/ written by safesail collect")
    ap.add_argument("--latents", type=int, default=12, help="latents to explain (the first ones of the first hook)")
    ap.add_argument("--max-segments", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    args = ap.parse_args()

    from safesail.config import compose
    from safesail.interpret.clients.cache import CachedClient
    from safesail.interpret.clients.local import LocalClient
    from safesail.interpret.explain import collected_hooks, run_explain_stage
    from safesail.logging_setup import setup_logging
    from safesail.rundir import RunDir

    setup_logging("WARNING")
    src = RunDir(Path(args.run_dir))
    hooks = collected_hooks(src)
    if not hooks:
        raise SystemExit(f"{src.root}/latents holds no collected latents; run `safesail collect` there first")
    hook = hooks[0]
    meta = json.loads((src.latents(hook) / "meta.json").read_text())
    from safetensors.torch import load_file

    ids = load_file(str(src.latents(hook) / "stats.safetensors"))["latent_ids"].tolist()
    too_few = {t["latent"] for t in meta.get("too_few", [])}
    chosen = [j for j in ids if j not in too_few][: args.latents]

    scratch = Path(tempfile.mkdtemp(prefix="bench_explain_"))
    t0 = time.monotonic()
    base = compose([f"run.root={scratch}", "device=cpu"])
    llm = LocalClient.from_cfg(base.llm, cache_dir=base.cache_dir, device="cpu")
    load_s = time.monotonic() - t0

    def run(name: str, concurrency: int, batch: int, cache_from: str | None = None) -> dict:
        root = scratch / name
        (root / "latents").mkdir(parents=True, exist_ok=True)
        shutil.copytree(src.latents(hook), root / "latents" / src.latents(hook).name)
        cache = scratch / (cache_from or name) / "interpret" / "llm_cache.sqlite"
        cfg = compose([f"run.root={scratch}", f"run.name={name}", "device=cpu", f"explain.concurrency={concurrency}",
                       f"explain.max_segments={args.max_segments}", f"explain.max_tokens={args.max_tokens}",
                       f"explain.hooks=[{hook}]", f"explain.latents=[{','.join(map(str, chosen))}]"])
        llm.batch_size = batch
        llm.batches = []
        client = CachedClient(llm, cache)
        t = time.monotonic()
        run_explain_stage(cfg, [], client=client)
        secs = time.monotonic() - t
        recs = [json.loads(x) for x in (root / "interpret" / "explanations.jsonl").read_text().splitlines()]
        n = len(recs)
        s = client.stats
        return {"latents": n, "ok": sum(r["status"] == "ok" for r in recs),
                "failed": {r["reason"]: sum(x["reason"] == r["reason"] for x in recs) for r in recs
                           if r["status"] != "ok"},
                "seconds": round(secs, 1), "latents_per_hour": round(3600 * n / secs, 1),
                "llm_calls_per_latent": round(s.calls / n, 2),
                "backend_calls_per_latent": round(s.misses / n, 2),
                "prompt_tokens_per_latent": round(sum(r["prompt_tokens"] for r in recs) / n, 1),
                "cache_hit_rate": round(s.hit_rate, 3), "generate_batches": llm.batches,
                "examples": [r["explanation"] for r in recs if r["status"] == "ok"][:5]}

    a = run("A-sequential", 1, 1)
    b = run("B-concurrent", 4, 4)
    c = run("C-cached", 4, 4, cache_from="B-concurrent")
    out = {"hook": hook, "latents": chosen, "model_load_s": round(load_s, 1), "A_sequential": a,
           "B_concurrent": b, "C_rerun_cached": c,
           "ratio_B_over_A_throughput": round(b["latents_per_hour"] / a["latents_per_hour"], 2),
           "ratio_C_over_B_throughput": round(c["latents_per_hour"] / b["latents_per_hour"], 1)}
    text = json.dumps(out, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
