"""The scorer family on real activations of the embedded default, with a real local LLM.

Collects a small sample through the pipeline's public functions, so it runs without a
trained SAE: the "dictionary" is a stand-in, a thresholded basis of the hook's own
coordinates (latent j = relu(x_j - q_j), q_j the coordinate's 0.99 quantile on a
calibration batch), sparse latents that fire on ~1% of tokens. Then the real stages:
`safesail explain` (the `llm` group) and `safesail score` with every scorer and both
controls, and two cost runs side by side on the first `--baseline-latents` latents
without controls, each through an empty response cache:

* batched: the defaults (simulation: `segments_per_call` segments per forward pass;
  detection and fuzzing: `batch_size` items per call);
* one item per call (segments_per_call=1, batch_size=1), as delphi's defaults do;

with one loaded model (load not timed), batched first and again last (load drifts on a
shared machine).

    python benchmarks/bench_score.py --latents 8 --baseline-latents 3 llm=qwen-coder-0.5b
    python benchmarks/bench_score.py --cost-only --baseline-latents 3 llm=qwen-coder-0.5b   # the cost runs alone
Writes runs/bench-score/ (and -batched, -unbatched) and prints a JSON summary (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

KINDS = ("simulation", "detection", "fuzzing")


class ThresholdBasis(torch.nn.Module):
    """encode(x) = relu(x[:, dims] - thresholds): a sparse stand-in for an SAE's encoder."""

    def __init__(self, thresholds: torch.Tensor):
        super().__init__()
        self.register_buffer("t", thresholds.float())
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # collect asks for a device

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.float() - self.t)


def collect_sample(cfg, hook: str, n_latents: int, max_tokens: int, seed: int) -> None:
    from safesail.corpus import iter_documents, pack_windows
    from safesail.hooks import HookPoint, capture_activations
    from safesail.interpret.collect import CollectSettings, HookInputs, collect_latents, corpus_cfg
    from safesail.models import load_model
    from safesail.rundir import RunDir

    rd = RunDir.from_cfg(cfg)
    loaded = load_model(cfg.model, "cpu", cache_dir=cfg.cache_dir)
    windows = list(pack_windows(iter_documents(corpus_cfg(cfg), loaded.tokenizer, cfg.model.get("system_prompt")),
                                loaded.tokenizer, 128, max_tokens))
    ids = torch.tensor([w.input_ids for w in windows[:16]])
    acts = capture_activations(loaded.model, ids, None, [HookPoint.parse(hook)])[hook].reshape(-1, loaded.hidden_size)
    q = torch.quantile(acts.float(), 0.99, dim=0)
    g = torch.Generator().manual_seed(seed)
    latent_ids = sorted(torch.randperm(loaded.hidden_size, generator=g)[:n_latents].tolist())
    hi = HookInputs(hook, ThresholdBasis(q), latent_ids, rd.latents(hook), {"sae": "threshold-basis stand-in"})
    collect_latents(loaded, [hi], windows, rd.root / "latents", CollectSettings.from_cfg(cfg.collect), "bench",
                    {"model": loaded.name, "ctx_len": 128}, len(windows))


def spearman(xs: list[float], ys: list[float]) -> float | None:
    from safesail.interpret.scoring.correlation import ScoreUndefined, pearson

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    try:
        return round(pearson(ranks(xs), ranks(ys)), 3)
    except ScoreUndefined:
        return None


def score_run(cfg, fresh: bool) -> tuple[dict, float]:
    from safesail.interpret.scoring.records import read_scores
    from safesail.interpret.scoring.stage import run_score_stage
    from safesail.rundir import RunDir

    rd = RunDir.from_cfg(cfg)
    if fresh:
        (rd.interpret / "llm_cache.sqlite").unlink(missing_ok=True)
        (rd.interpret / "scores.jsonl").unlink(missing_ok=True)
        (rd.stages / "score.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    run_score_stage(cfg, [])
    return read_scores(rd.interpret / "scores.jsonl"), time.perf_counter() - t0


def per_kind(recs: dict) -> dict:
    from safesail.interpret.scoring.summary import summarize

    out = summarize(list(recs.values()))["kinds"]
    for kind, s in out.items():
        s.pop("failures", None)
        rs = [r for r in recs.values() if r.kind == kind]
        s["values"] = {f"{r.latent}": [_r(r.value), _r(r.control_shuffled), _r(r.control_constant)] for r in rs}
        if kind != "simulation":
            au = [r.details.get("metrics", {}).get("auroc") for r in rs if r.ok]
            au = [a for a in au if a is not None]
            s["mean_auroc"] = _r(sum(au) / len(au)) if au else None
        for k, v in list(s.items()):
            if isinstance(v, float):
                s[k] = round(v, 3)
    return out


def _r(x):
    return None if x is None else round(x, 3)


def cost_runs(a, base: list[str]) -> dict:
    """Batched vs one item per call on the first latents, no controls, each through an empty response
    cache, with one loaded model (its load is not timed); the batched run goes first and again last."""
    import asyncio

    from safesail.config import compose
    from safesail.interpret.clients import make_client
    from safesail.interpret.clients.cache import CachedClient
    from safesail.interpret.scoring.inputs import load_explanations
    from safesail.interpret.scoring.records import read_scores
    from safesail.interpret.scoring.stage import score_latents, score_settings
    from safesail.rundir import RunDir

    unbatched = ["score.segments_per_call=1", "score.detection.batch_size=1", "score.fuzzing.batch_size=1"]
    cfg0 = compose([f"run.dir={a.run}", *base])
    inner = make_client(cfg0.llm, None, cache_dir=cfg0.cache_dir, device="cpu")
    cost = {}
    for name, extra in (("batched", []), ("unbatched", unbatched), ("batched_again", [])):
        run_dir = f"{a.run}-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(Path(a.run) / "latents", Path(run_dir) / "latents")
        (Path(run_dir) / "interpret").mkdir(parents=True)
        shutil.copy(Path(a.run) / "interpret" / "explanations.jsonl", Path(run_dir) / "interpret")
        cfg = compose([f"run.dir={run_dir}", *base, "score.controls=[]", *extra])
        rd = RunDir.from_cfg(cfg)
        expls = load_explanations(rd)
        keys = sorted(expls)[: a.baseline_latents]
        client = CachedClient(inner, rd.interpret / "llm_cache.sqlite")
        t0 = time.perf_counter()
        asyncio.run(score_latents(rd, cfg, score_settings(cfg), client, expls, keys))
        secs = time.perf_counter() - t0
        k = per_kind(read_scores(rd.interpret / "scores.jsonl"))
        cost[name] = {"seconds": round(secs, 1), "latents": len(keys),
                      **{kind: {"calls_per_latent": k[kind]["calls_per_latent"],
                                "prompt_tokens_per_latent": k[kind]["prompt_tokens_per_latent"],
                                "mean": k[kind]["mean"]} for kind in k}}
    b = (cost["batched"]["seconds"] + cost["batched_again"]["seconds"]) / 2
    cost["seconds_ratio_unbatched_over_batched"] = round(cost["unbatched"]["seconds"] / b, 2)
    return cost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, default=8)
    ap.add_argument("--baseline-latents", type=int, default=3)
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=16384, help="corpus tokens streamed by collect")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default="runs/bench-score")
    ap.add_argument("--cost-only", action="store_true", help="only the batched vs one-per-call runs")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. llm=qwen-coder-0.5b")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from safesail.config import compose
    from safesail.interpret.explain import run_explain_stage

    hook = f"layers.{a.layer}.mlp_out"
    base = ["device=cpu", "collect.n_levels=5", "collect.score_per_level=1", "collect.explain_per_level=2",
            "collect.random_score=3", "collect.random_explain=1", "collect.segment_len=16", "collect.min_examples=3",
            "data.ctx_len=128", "explain.top_per_domain=null", "score.scorers=[simulation,detection,fuzzing]",
            *a.overrides]
    cfg = compose([f"run.dir={a.run}", *base])
    if a.cost_only:
        out = {"llm": cfg.llm.name, "load_before": os.getloadavg(), "cost": cost_runs(a, base),
               "load_after": os.getloadavg()}
        Path(a.run, "bench_score_cost.json").write_text(json.dumps(out, indent=2))
        print(json.dumps(out, indent=2))
        return
    out = {"llm": cfg.llm.name, "layer": a.layer, "latents_sampled": a.latents, "load_before": os.getloadavg()}
    t0 = time.perf_counter()
    if not (Path(a.run) / "latents" / hook / "segments.jsonl").is_file():
        collect_sample(cfg, hook, a.latents, a.max_tokens, a.seed)
    out["collect_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    run_explain_stage(cfg, [])
    out["explain_seconds"] = round(time.perf_counter() - t0, 1)

    recs, secs = score_run(cfg, fresh=False)
    latents = sorted({r.latent for r in recs.values()})
    out["family"] = {"seconds": round(secs, 1), "latents": len(latents),
                     "latents_per_hour_all_scorers_and_controls": round(len(latents) / secs * 3600, 1),
                     "kinds": per_kind(recs)}
    vals = {k: {r.latent: r.value for r in recs.values() if r.kind == k and r.ok} for k in KINDS}
    out["rank_correlation"] = {}
    for i, k1 in enumerate(KINDS):
        for k2 in KINDS[i + 1:]:
            both = sorted(set(vals[k1]) & set(vals[k2]))
            out["rank_correlation"][f"{k1}~{k2}"] = {"n": len(both), "spearman": spearman(
                [vals[k1][j] for j in both], [vals[k2][j] for j in both]) if len(both) >= 3 else None}

    out["cost"] = cost_runs(a, base)
    out["load_after"] = os.getloadavg()
    Path(a.run, "bench_score.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
