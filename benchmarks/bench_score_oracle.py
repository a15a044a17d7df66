"""Is the simulation scorer or the explainer the bottleneck? Oracle vs explainer vs controls, side by side.

On a finished run (the demo), every explained latent's held-out score set is simulated with four
explanations: the explainer's own, an "oracle" one a reader wrote from the latent's top
explain-split segments (`ORACLE` below; `benchmarks/read_latents.py` prints them), the stage's
shuffled partner (another latent's explanation, `controls.shuffled_partners`) and the constant
content-free one. For each prompt style (`scoring/prompts/simulation.STYLES`) and each score set
(`--score-set`: the collect stage's whole score split, or only its top-level activating segments plus
the random ones) the slot log-probabilities of one forward pass per `segments_per_call` segments are
read out three ways: the expected value (the scorer's), P(answer > 0) and the argmax. The value is
Pearson over the latent's pooled tokens (`correlation.pearson`), as the stage computes it.

    OMP_NUM_THREADS=1 python benchmarks/bench_score_oracle.py --run /tmp/score/runs/demo \\
        --styles v1 v2 llm=qwen-coder-1.5b llm.threads=1

Replies go to the run's response cache (interpret/llm_cache.sqlite), so a repeat costs nothing and
the stage's own v1 calls are hits. Prints a JSON summary and writes <run>/bench_score_oracle.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
from pathlib import Path

# A reader's explanation of each demo latent from its top explain-split segments (run 2026-12-01,
# /tmp/et/runs/demo; BENCHMARKS.md "Explain and tag (issue 13)" has the segments).
ORACLE = {
    ("layers.0.mlp_out", 143): "the words terror and terrorist (also the Chinese 恐怖分子), and inhuman",
    ("layers.0.mlp_out", 2421): "Chinese characters in text about injuries and harm, and the word violent",
    ("layers.0.mlp_out", 2653): "Hindi (Devanagari) letters and vowel signs; also DNA and Rights",
    ("layers.0.mlp_out", 3060): "adjectives and nouns of harm or intensity: severe, inflicted, firearm, terrorism, "
                                "mocking, gripping",
    ("layers.0.mlp_out", 5254): "names of social media platforms (Facebook, Instagram), treaties (Versailles) and the "
                                "word violent",
    ("layers.7.mlp_out", 700): "sexual content words: sexual, erotica, pornography",
    ("layers.7.mlp_out", 850): "the word attack or attacks, as in terrorist attacks",
    ("layers.7.mlp_out", 4219): "words for crimes and abuses: war crimes, violations, extremism, terrorist",
    ("layers.21.mlp_out", 2878): "common words in safety advice: the, get, make (sure), when",
    ("layers.29.mlp_out", 9): "line breaks and the bold ** or number that starts a list item",
    ("layers.29.mlp_out", 754): "international institutions and treaties: UN, General Assembly, Universal "
                                "Declaration, treaty",
}
READOUTS = ("ev", "p_active", "argmax")
ALL_READOUTS = READOUTS + ("ev-constant", "p_active-constant")


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def readout(lps: dict[str, float], scale_max: int, how: str) -> float:
    vals = [(v, lps[str(v)]) for v in range(scale_max + 1) if str(v) in lps and math.isfinite(lps[str(v)])]
    top = max(lp for _, lp in vals)
    w = [(v, math.exp(lp - top)) for v, lp in vals]
    tot = sum(x for _, x in w)
    if how == "ev":
        return sum(v * x for v, x in w) / tot
    if how == "p_active":
        return 1.0 - sum(x for v, x in w if v == 0) / tot
    return float(max(w, key=lambda t: t[1])[0])


async def simulate(client, style: str, explanation: str, segs: list[list[str]], scale_max: int, per_call: int,
                   merge: bool = False):
    """Per readout, the predictions of every segment (lists), from one forward pass per `per_call` segments;
    with `merge` each segment is shown as `simulation.shown_units` (empty pieces joined to their character)."""
    from safesail.interpret.scoring.prompts import simulation as prompts
    from safesail.interpret.scoring.simulation import shown_units
    from safesail.interpret.scoring.simulator import find_slots

    if merge:
        shown = [shown_units(t) for t in segs]
        got = await simulate(client, style, explanation, [u for u, _ in shown], scale_max, per_call)
        return {h: [[seg[o] for o in owner] for seg, (_, owner) in zip(got[h], shown)] for h in got}
    out = {h: [] for h in READOUTS}
    cands = prompts.answer_words(style, scale_max)
    for i in range(0, len(segs), per_call):
        group = segs[i:i + per_call]
        prompt, n_before = prompts.logprob_prompt_many(explanation, group, scale_max, style)
        res = await client.prompt_logprobs(prompt, cands, slots_ending_with=prompts.SEPARATOR)
        slots = find_slots(res.tokens, n_before, sum(len(t) for t in group))
        pos = 0
        for toks in group:
            mine = slots[pos:pos + len(toks)]
            pos += len(toks)
            for h in READOUTS:
                if style in prompts.YES_NO:  # P(yes) on the scale, whatever the readout
                    out[h].append([scale_max / (1 + math.exp(res.next_logprobs[j][prompts.NO]
                                                             - res.next_logprobs[j][prompts.YES])) for j in mine])
                else:
                    out[h].append([readout(res.next_logprobs[j], scale_max, h) for j in mine])
    return out


def value(true_segs, pred_segs) -> float | None:
    from safesail.interpret.scoring.correlation import ScoreUndefined, pearson

    try:
        return pearson([v for s in true_segs for v in s], [v for s in pred_segs for v in s])
    except ScoreUndefined:
        return None


def pick(segs: list[dict], score_set: str) -> list[dict]:
    if score_set == "all":
        return segs
    act = [s for s in segs if s.get("kind") == "activating"]
    top = max((s.get("level") or 0) for s in act) if act else 0
    keep = [s for s in act if (s.get("level") or 0) >= top - (1 if score_set == "top2" else 0)]
    return keep + [s for s in segs if s.get("kind") != "activating"]


def figures(rows: list[dict], key: str) -> dict:
    vals = [r[key] for r in rows]
    ok = [v for v in vals if v is not None]
    beats = [r[key] is not None and r["shuffled"] is not None and r[key] > r["shuffled"] for r in rows]
    return {"median": round(statistics.median(ok), 3) if ok else None,
            "mean": round(statistics.fmean(ok), 3) if ok else None,
            "pass_0.2": f"{sum(v >= 0.2 for v in ok)} / {len(rows)}",
            "beats_shuffled": f"{sum(beats)} / {len(rows)}", "undefined": len(vals) - len(ok)}


async def run(a, cfg) -> dict:
    from safesail.interpret.clients import make_client
    from safesail.interpret.scoring import controls as ctl
    from safesail.interpret.scoring.inputs import load_explanations, load_score_segments
    from safesail.interpret.scoring.simulator import single_token_scale
    from safesail.rundir import RunDir

    rd = RunDir.from_cfg(cfg)
    expls = load_explanations(rd)
    partners = ctl.shuffled_partners(expls)
    keys = [k for k in sorted(expls) if k in ORACLE and expls[k].get("status") == "ok"][: a.max_latents]
    segs = {h: load_score_segments(rd, h) for h in {k[0] for k in keys}}
    client = make_client(cfg.llm, rd.llm_cache_file, cache_dir=cfg.get("cache_dir"), device="cpu")
    scale = single_token_scale(client, 10)
    out = {"llm": client.model_name, "scale_max": scale, "latents": len(keys), "load_before": os.getloadavg(),
           "per_call": a.per_call, "merge": a.merge, "runs": {}}
    try:
        for style in a.styles:
            for score_set in a.score_sets:
                t0 = time.perf_counter()
                rows = {h: [] for h in ALL_READOUTS}
                preds = {}
                for key in keys:
                    chosen = pick(segs[key[0]].get(key[1], []), score_set)
                    toks = [list(s["tokens"]) for s in chosen]
                    true = [list(map(float, s["acts"])) for s in chosen]
                    texts = {"own": expls[key]["explanation"], "oracle": ORACLE[key],
                             "shuffled": expls[partners[key]]["explanation"] if partners.get(key) else None,
                             "constant": cfg.score.constant_explanation}
                    sims = {n: await simulate(client, style, t, toks, scale, a.per_call, a.merge)
                            for n, t in texts.items() if t and n in a.texts}
                    for h in READOUTS:
                        rows[h].append({"latent": f"{key[0]}#{key[1]}", "own_text": texts["own"],
                                        **{n: _round(value(true, sims[n][h])) if n in sims else None for n in texts}})
                    for h in ("ev", "p_active"):  # the explanation's prediction minus the constant one's, per token
                        if "constant" not in sims:
                            continue
                        base = sims["constant"][h]
                        rows[f"{h}-constant"].append(
                            {"latent": f"{key[0]}#{key[1]}", "constant": None,
                             **{n: _round(value(true, [[p - b for p, b in zip(ps, bs)] for ps, bs in zip(sims[n][h], base)]))
                                if n in sims else None for n in ("own", "oracle", "shuffled")}})
                    preds[f"{key[0]}#{key[1]}"] = {"tokens": toks, "true": true, **{
                        n: [[round(v, 2) for v in seg] for seg in sims[n]["ev"]] for n in sims}}
                secs = time.perf_counter() - t0
                out["runs"][f"{style}/{score_set}"] = {
                    "seconds": round(secs, 1), "segments_per_latent": statistics.fmean(
                        len(pick(segs[k[0]].get(k[1], []), score_set)) for k in keys),
                    **{h: {"own": figures(rows[h], "own"), "oracle": figures(rows[h], "oracle"),
                           "constant": figures(rows[h], "constant"), "rows": rows[h]} for h in ALL_READOUTS},
                    "preds_ev": preds}
                print(json.dumps({f"{style}/{score_set}": {h: {n: out["runs"][f"{style}/{score_set}"][h][n]
                                                               for n in ("own", "oracle")} for h in ALL_READOUTS},
                                  "seconds": round(secs, 1)}), flush=True)
    finally:
        await client.aclose()
    out["load_after"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a finished run directory (explain and collect done)")
    ap.add_argument("--styles", nargs="+", default=["v1"])
    ap.add_argument("--score-sets", nargs="+", default=["all"], choices=["all", "top", "top2"])
    ap.add_argument("--per-call", type=int, default=4, help="segments per forward pass (score.segments_per_call)")
    ap.add_argument("--max-latents", type=int, default=None)
    ap.add_argument("--texts", nargs="+", default=["own", "oracle", "shuffled", "constant"])
    ap.add_argument("--merge", action="store_true", help="show a character split over tokens once (shown_units)")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. llm=qwen-coder-0.5b llm.threads=1")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from safesail.config import compose

    cfg = compose([f"run.dir={a.run}", "experiment=demo", "device=cpu", *a.overrides])
    out = asyncio.run(run(a, cfg))
    path = Path(a.out or Path(a.run) / "bench_score_oracle.json")
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    print(json.dumps({k: {h: {n: v[h][n] for n in ("own", "oracle", "constant")} for h in ALL_READOUTS}
                      for k, v in out["runs"].items()}, indent=1))


if __name__ == "__main__":
    main()
