"""Check the scorer on the embedded default (SmolLM2-135M-Instruct as source model, explainer and simulator).

Collects its own small sample through the pipeline's public functions, so it runs before
a trained SAE exists: the "dictionary" is a stand-in, a thresholded basis of the hook's
own coordinates (latent j = relu(x_j - q_j), q_j the coordinate's 0.99 quantile on a
calibration batch), which makes sparse latents that fire on ~1% of tokens. Then:
collect (`collect_latents`) -> explain (`explain_latent`) -> score (`simulate_latent`), and

1. own explanation vs another latent's (shuffled: latent i gets latent i+1's explanation),
   segment-level, logprobs mode: means, how often own wins, score distribution, pass 0.2;
2. segment-level vs whole-query simulation of the own explanations on the same latents:
   LLM calls, prompt tokens and seconds per latent.

    python benchmarks/bench_score.py --latents 12 --layer 7
Writes runs/bench-score/ and prints a JSON summary (pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch


class ThresholdBasis(torch.nn.Module):
    """encode(x) = relu(x[:, dims] - thresholds): a sparse stand-in for an SAE's encoder."""

    def __init__(self, thresholds: torch.Tensor):
        super().__init__()
        self.register_buffer("t", thresholds.float())
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # collect asks for a device

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.float() - self.t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, default=12)
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=16384, help="corpus tokens streamed by collect")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default="runs/bench-score")
    ap.add_argument("--fresh-sim", action="store_true",
                    help="simulate through a new, empty response cache (explanations may still come from the cache)")
    ap.add_argument("--keep-cache", action="store_true",
                    help="reuse earlier replies (seconds are then reported only for latents simulated afresh)")
    a = ap.parse_args()

    from safesail.config import compose
    from safesail.corpus import iter_documents, pack_windows
    from safesail.hooks import HookPoint, capture_activations
    from safesail.interpret.clients import make_client
    from safesail.interpret.collect import CollectSettings, HookInputs, collect_latents, corpus_cfg
    from safesail.interpret.explain import explain_latent, load_tasks
    from safesail.interpret.scoring.stage import simulate_latent
    from safesail.interpret.scoring.inputs import load_score_segments
    from safesail.interpret.scoring.simulator import Simulator
    from safesail.interpret.scoring.windows import window_lookup
    from safesail.models import load_model
    from safesail.rundir import RunDir

    hook = f"layers.{a.layer}.mlp_out"
    cfg = compose([f"run.dir={a.run}", "device=cpu", "collect.n_levels=5", "collect.score_per_level=1",
                   "collect.explain_per_level=2", "collect.random_score=4", "collect.random_explain=1",
                   "collect.segment_len=16", "collect.min_examples=3", "data.ctx_len=128"])
    rd = RunDir.from_cfg(cfg)
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, "cpu", cache_dir=cfg.cache_dir)
    data_cfg = corpus_cfg(cfg)
    windows = list(pack_windows(iter_documents(data_cfg, loaded.tokenizer, cfg.model.get("system_prompt")),
                                loaded.tokenizer, 128, a.max_tokens))
    # calibration: the 0.99 quantile of each coordinate on the first 16 windows
    ids = torch.tensor([w.input_ids for w in windows[:16]])
    acts = capture_activations(loaded.model, ids, None, [HookPoint.parse(hook)])[hook].reshape(-1, loaded.hidden_size)
    q = torch.quantile(acts.float(), 0.99, dim=0)
    g = torch.Generator().manual_seed(a.seed)
    latent_ids = sorted(torch.randperm(loaded.hidden_size, generator=g)[: a.latents].tolist())
    sae = ThresholdBasis(q)
    s = CollectSettings.from_cfg(cfg.collect)
    hi = HookInputs(hook, sae, latent_ids, rd.latents(hook), {"sae": "threshold-basis stand-in"})
    collect_latents(loaded, [hi], windows, rd.root / "latents", s, "bench", {"model": loaded.name, "ctx_len": 128},
                    len(windows))
    t_collect = time.perf_counter() - t0
    del loaded

    if not a.keep_cache:
        (rd.interpret / "llm_cache.sqlite").unlink(missing_ok=True)  # fresh cache: honest seconds
    client = make_client(cfg.llm, rd.interpret / "llm_cache.sqlite", cache_dir=cfg.cache_dir, device="cpu")
    sim_client = client
    if a.fresh_sim:
        from safesail.interpret.clients.cache import CachedClient

        sim_path = rd.interpret / f"sim_cache_{int(time.time())}.sqlite"
        sim_client = CachedClient(client.inner, sim_path)
    out = asyncio.run(_explain_and_score(client, sim_client, rd, cfg, hook, latent_ids, explain_latent, load_tasks,
                                         simulate_latent, load_score_segments, Simulator, window_lookup))
    out.update(collect_seconds=round(t_collect, 1), layer=a.layer, latents_sampled=len(latent_ids),
               max_tokens=a.max_tokens)
    Path(rd.root / "bench_score.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


async def _explain_and_score(client, sim_client, rd, cfg, hook, latent_ids, explain_latent, load_tasks, simulate_latent,
                             load_score_segments, Simulator, window_lookup) -> dict:
    t = time.perf_counter()
    tasks = load_tasks(rd, hook, latent_ids)
    expls = {}
    for task in tasks:
        rec = await explain_latent(client, task, cfg.explain)
        if rec["status"] == "ok":
            expls[task.latent] = rec["explanation"]
    t_explain = time.perf_counter() - t
    segs = load_score_segments(rd, hook)
    lat = [j for j in latent_ids if j in expls and segs.get(j)]
    sim = Simulator(sim_client, "logprobs")
    lookup = window_lookup(rd, cfg, hook, [s for j in lat for s in segs[j]])

    async def run(j, text, gran):
        return await simulate_latent(sim, text, segs[j], gran, lookup if gran == "query" else None)

    own, shuf, query = {}, {}, {}
    for i, j in enumerate(lat):
        other = lat[(i + 1) % len(lat)]
        own[j] = await run(j, expls[j], "segment")
        shuf[j] = await run(j, expls[other], "segment")
        query[j] = await run(j, expls[j], "query")

    def stats(runs):
        ok = [r.score for r in runs.values() if r.score is not None]
        fails = [r.failure.split(":")[0] for r in runs.values() if r.score is None]
        return {"scored": len(ok), "failed": len(fails), "failures": {f: fails.count(f) for f in set(fails)},
                "mean": round(statistics.mean(ok), 4) if ok else None,
                "median": round(statistics.median(ok), 4) if ok else None,
                "min": round(min(ok), 4) if ok else None, "max": round(max(ok), 4) if ok else None,
                "pass_0.2": sum(1 for x in ok if x >= 0.2),
                "scores": sorted(round(x, 3) for x in ok)}

    both = [j for j in lat if own[j].score is not None and shuf[j].score is not None]

    # calls and prompt tokens do not depend on the cache; seconds only count latents simulated afresh
    fresh = [j for j in lat if own[j].cached_calls == 0 and query[j].cached_calls == 0]

    def cost(runs):
        n = len(runs)
        return {"llm_calls_per_latent": round(sum(r.llm_calls for r in runs.values()) / n, 2),
                "prompt_tokens_per_latent": round(sum(r.prompt_tokens for r in runs.values()) / n, 1),
                "seconds_per_latent": round(sum(runs[j].seconds for j in fresh) / max(1, len(fresh)), 2),
                "latents_timed": len(fresh),
                # seconds per call actually made (cache hits excluded), over all latents
                "seconds_per_fresh_call": round(sum(r.seconds for r in runs.values())
                                                / max(1, sum(r.llm_calls - r.cached_calls for r in runs.values())), 3)}

    seg_cost, q_cost = cost(own), cost(query)
    return {
        "explained": len(expls), "scored_latents": len(lat), "explain_seconds": round(t_explain, 1),
        "simulator": client.model_name, "mode": sim.mode, "scale_max": sim.scale_max,
        "own": stats(own), "shuffled": stats(shuf),
        "own_wins": sum(1 for j in both if own[j].score > shuf[j].score), "pairs_compared": len(both),
        "query_granularity": stats(query),
        "cost_segment": seg_cost, "cost_query": q_cost,
        "prompt_token_saving_segment_vs_query": round(1 - seg_cost["prompt_tokens_per_latent"]
                                                      / q_cost["prompt_tokens_per_latent"], 3),
        "seconds_saving_segment_vs_query": (round(1 - seg_cost["seconds_per_latent"] / q_cost["seconds_per_latent"], 3)
                                            if fresh else None),
        "per_latent": {str(j): {"explanation": expls[j], "own": own[j].score, "shuffled": shuf[j].score,
                                "query": query[j].score,
                                "failures": [x for x in (own[j].failure, shuf[j].failure, query[j].failure) if x]}
                       for j in lat},
    }


if __name__ == "__main__":
    main()
