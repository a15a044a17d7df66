"""`safesail score`: score every explanation by simulation (writes interpret/scores.jsonl).

For each explained latent, the simulator (`simulate.Simulator`) predicts the latent's
activation on every token of its held-out score segments (activating + random), and
the score is the Pearson correlation with the true activations (`scoring`). Latents
run concurrently (bounded); every record is appended as soon as it is done, and LLM
replies live in the response cache `interpret/llm_cache.sqlite`, so a killed run
continues where it stopped and a re-run repeats no call. Format: docs/scoring.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safesail.errors import UserError
from safesail.interpret.scoring.inputs import WindowLookup, explanation_key, load_explanations, load_score_segments
from safesail.interpret.scoring.correlation import SegmentSim, score_segments
from safesail.interpret.scoring.simulator import Simulator
from safesail.jsonl import append_jsonl, last_per_latent, open_append
from safesail.rundir import RunDir, fingerprint

log = logging.getLogger(__name__)

GRANULARITIES = ("segment", "query")
INCLUSION_CUT = 0.2  # Safe-SAIL keeps explanations scoring at least this


@dataclass
class LatentRun:
    """The simulation of one latent: what goes into its scores.jsonl record."""
    score: float | None
    failure: str | None
    segments: list[SegmentSim]
    n_tokens: int
    llm_calls: int
    cached_calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float


async def simulate_latent(sim: Simulator, explanation: str, segments: list[dict], granularity: str = "segment",
                          window_lookup: WindowLookup | None = None, sem: asyncio.Semaphore | None = None,
                          min_ok_fraction: float = 1.0) -> LatentRun:
    """Simulate a latent's score segments (each alone, or inside its whole source query) and score them."""
    t0 = time.perf_counter()
    sem = sem or asyncio.Semaphore(1)
    sims = [SegmentSim(str(s["segment_id"]), str(s.get("kind", "")), list(s["tokens"]),
                       [float(a) for a in s["acts"]]) for s in segments]
    totals = Counter()

    async def run(tokens: list[str]):
        async with sem:
            res = await sim.simulate(explanation, tokens)
        totals.update(llm_calls=res.llm_calls, cached_calls=res.cached_calls, prompt_tokens=res.prompt_tokens,
                      completion_tokens=res.completion_tokens)
        return res

    if granularity == "segment":
        results = await asyncio.gather(*(run(s.tokens) for s in sims))
        for s, res in zip(sims, results):
            s.pred, s.failure = res.pred, res.failure
    elif granularity == "query":
        if window_lookup is None:
            raise UserError("score.granularity=query needs the segments' source windows, which this run does not "
                            "provide; use score.granularity=segment.")
        placed = []  # (sim, window key, offset)
        windows: dict[tuple, list[str]] = {}
        for s, rec in zip(sims, segments):
            wtoks, off = window_lookup(rec)
            key = tuple(wtoks)
            windows[key] = list(wtoks)
            placed.append((s, key, off))
        keys = list(windows)
        results = dict(zip(keys, await asyncio.gather(*(run(windows[k]) for k in keys))))
        for s, key, off in placed:
            res = results[key]
            if windows[key][off:off + len(s.tokens)] != s.tokens:
                s.failure = "token_mismatch: the source window does not hold the segment at its offset"
            elif res.failure:
                s.failure = res.failure
            else:
                s.pred = res.pred[off:off + len(s.tokens)]
    else:
        raise UserError(f"unknown score.granularity {granularity!r}; use segment or query.")
    ls = score_segments(sims, min_ok_fraction)
    return LatentRun(ls.score, ls.failure, sims, ls.n_tokens, totals["llm_calls"], totals["cached_calls"],
                     totals["prompt_tokens"], totals["completion_tokens"], time.perf_counter() - t0)


def score_record(hook: str, layer, latent: int, expl: dict, sim: Simulator, granularity: str,
                 run: LatentRun | None, failure: str | None = None) -> dict:
    score = run.score if run else None
    failure = run.failure if run else failure
    return {
        "hook": hook, "layer": layer, "latent": int(latent),
        "status": "ok" if failure is None else "failed",
        "score": score, "failure": failure,
        "kind": "simulation", "mode": sim.mode, "granularity": granularity,
        "simulator": sim.client.model_name, "prompt_version": sim.prompt_version, "scale_max": sim.scale_max,
        "explanation_key": explanation_key(expl),
        "n_tokens": run.n_tokens if run else 0,
        "llm_calls": run.llm_calls if run else 0,
        "cached_calls": run.cached_calls if run else 0,
        "prompt_tokens": run.prompt_tokens if run else 0,
        "completion_tokens": run.completion_tokens if run else 0,
        "seconds": round(run.seconds, 4) if run else 0.0,
        "segments": [s.as_record() for s in run.segments] if run else [],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _is_current(rec: dict, expl: dict, sim: Simulator, granularity: str) -> bool:
    """A stored record stands unless settings or the explanation changed, or its LLM call failed."""
    return (rec.get("explanation_key") == explanation_key(expl) and rec.get("mode") == sim.mode
            and rec.get("granularity") == granularity and rec.get("simulator") == sim.client.model_name
            and rec.get("prompt_version") == sim.prompt_version
            and "llm_error" not in str(rec.get("failure") or ""))


def summarize(records: list[dict]) -> dict:
    ok = [r["score"] for r in records if r["status"] == "ok"]
    fails = Counter(str(r["failure"]).split(":")[0] for r in records if r["status"] != "ok")
    return {"latents": len(records), "scored": len(ok), "failed": sum(fails.values()), "failures": dict(fails),
            "mean_score": (sum(ok) / len(ok)) if ok else None,
            f"pass_{INCLUSION_CUT}": sum(1 for s in ok if s >= INCLUSION_CUT)}


def _score_cfg(cfg: DictConfig) -> dict:
    sc = OmegaConf.to_container(cfg.get("score") or {}, resolve=True) or {}
    return {"mode": sc.get("mode", "auto"), "granularity": sc.get("granularity", "segment"),
            "max_value": int(sc.get("max_value", 10)), "min_ok_fraction": float(sc.get("min_ok_fraction", 1.0)),
            "concurrency": int(sc.get("concurrency") or cfg.llm.get("concurrency", 4)),
            "query_max_tokens": int(sc.get("query_max_tokens", 384)),
            "json_tokens_per_token": int(sc.get("json_tokens_per_token", 24)),
            "hooks": sc.get("hooks"), "max_latents": sc.get("max_latents")}


def run_score_stage(cfg: DictConfig, args: list[str]) -> None:
    if args:
        raise UserError(f"`safesail score` takes no arguments, got {' '.join(args)!r}; pass settings as "
                        "score.key=value.")
    sc = _score_cfg(cfg)
    if sc["granularity"] not in GRANULARITIES:
        raise UserError(f"unknown score.granularity {sc['granularity']!r}; use segment or query.")
    if not 0.0 < sc["min_ok_fraction"] <= 1.0:
        raise UserError(f"score.min_ok_fraction={sc['min_ok_fraction']} is outside (0, 1]; use e.g. 1.0.")
    rd = RunDir.from_cfg(cfg)
    expls = load_explanations(rd)
    keys = sorted(k for k in expls if sc["hooks"] is None or k[0] in set(sc["hooks"]))
    if sc["max_latents"]:
        keys = keys[: int(sc["max_latents"])]
    fp = fingerprint({"score": {k: v for k, v in sc.items() if k != "concurrency"},
                      "llm": OmegaConf.to_container(cfg.llm, resolve=True),
                      "explanations": [[h, l, explanation_key(expls[(h, l)])] for h, l in keys]})
    if rd.stage_done("score", fp):
        log.info("score: already done for these explanations and settings; nothing to do")
        return
    from safesail.interpret.clients import make_client

    client = make_client(cfg.llm, rd.interpret / "llm_cache.sqlite", cache_dir=cfg.get("cache_dir"),
                         device=str(cfg.get("device", "auto")))
    asyncio.run(_score_all(rd, cfg, sc, client, expls, keys, fp))


async def _score_all(rd: RunDir, cfg: DictConfig, sc: dict, client, expls: dict, keys: list, fp: str) -> None:
    try:
        await _score_todo(rd, cfg, sc, client, expls, keys)
    finally:
        await client.aclose()
    final = last_per_latent(rd.interpret / "scores.jsonl")
    summary = summarize([final[k] for k in keys if k in final])
    log.info("score: %s", summary)
    rd.mark_stage("score", fp, **summary)


async def _score_todo(rd: RunDir, cfg: DictConfig, sc: dict, client, expls: dict, keys: list) -> None:
    sim = Simulator(client, sc["mode"], sc["max_value"], sc["json_tokens_per_token"])
    log.info("score: simulator %s, mode %s (scale 0..%d), %s-level", client.model_name, sim.mode, sim.scale_max,
             sc["granularity"])
    out_path = rd.interpret / "scores.jsonl"
    stored = last_per_latent(out_path)
    segs_by_hook = {h: load_score_segments(rd, h) for h in sorted({h for h, _ in keys})}
    windows = None
    if sc["granularity"] == "query":
        from safesail.interpret.scoring.windows import window_lookup

        windows = {h: window_lookup(rd, cfg, h, [s for k in keys if k[0] == h for s in segs_by_hook[h].get(k[1], [])],
                                    sc["query_max_tokens"]) for h in segs_by_hook}
    todo = [k for k in keys if not (k in stored and _is_current(stored[k], expls[k], sim, sc["granularity"]))]
    log.info("score: %d explained latents, %d already scored, %d to do", len(keys), len(keys) - len(todo), len(todo))
    sem = asyncio.Semaphore(max(1, sc["concurrency"]))
    rd.interpret.mkdir(parents=True, exist_ok=True)
    with open_append(out_path) as f, tqdm(total=len(todo), desc="score", unit="latent") as bar:
        async def one(key):
            hook, latent = key
            expl = expls[key]
            if expl.get("status") != "ok" or not str(expl.get("explanation") or "").strip():
                rec = score_record(hook, expl.get("layer"), latent, expl, sim, sc["granularity"], None,
                                   f"no_explanation: {expl.get('error') or 'the explanation is empty'}")
            else:
                segs = segs_by_hook[hook].get(latent, [])
                if not segs:
                    rec = score_record(hook, expl.get("layer"), latent, expl, sim, sc["granularity"], None,
                                       "no_score_segments: collect kept no held-out segments for this latent")
                else:
                    run = await simulate_latent(sim, str(expl["explanation"]), segs, sc["granularity"],
                                                windows[hook] if windows else None, sem, sc["min_ok_fraction"])
                    rec = score_record(hook, expl.get("layer"), latent, expl, sim, sc["granularity"], run)
            append_jsonl(f, rec)
            bar.update(1)
            return rec

        await asyncio.gather(*(one(k) for k in todo))
