"""Sufficiency (issue 15): does steering a tagged latent make the answer about its explanation?

Parts (``--parts``):

* ``judge``: validates the judge on hand-made pairs of short answers to one query, one about the
  topic and one not (``obvious``: different subjects; ``subtle``: the same subject, one with a few
  on-topic words, like a steered answer): the paired judge is asked in both orders (accuracy and
  the share of "A" replies, its position bias), the absolute judge once per text (yes on the
  on-topic text, no on the other). The judge is the ``llm`` group's client (``--set llm=...``).
* ``stage``: summarises a finished `safesail verify` run (``--run``): per latent its strength, the
  paired win rate against the random latent and against the unsteered answer (value, 95% interval,
  wins/losses/ties, share of first-position picks, sign-test p), the graded p(yes) comparisons
  (p_yes_win_vs_*, p_yes_vs_*), the absolute on-concept rates, and the share of latents that steer
  on-concept more than the random control at 95% by each judge (graded: p_yes_win_vs_random's
  interval above 0.5, the stage's criterion; paired: interval above 0.5; thresholded verdicts:
  interval of on_concept_vs_random above 0).

    OMP_NUM_THREADS=1 python benchmarks/bench_verify_sufficiency.py --parts judge --set llm=qwen-coder-1.5b
    python benchmarks/bench_verify_sufficiency.py --parts stage --run /tmp/vs/runs/demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# (topic, on-topic answer, off-topic answer) to one query
OBVIOUS = [
    ("sex and pornography", "The site shows explicit sex videos and nude photos of adult performers.",
     "Heat waves are long periods of unusually hot weather in summer."),
    ("violence", "He punched the man, then stabbed him twice with a kitchen knife.",
     "Bird censuses count how many birds of each species live in an area."),
    ("terrorist activities", "The militants planted a car bomb outside the embassy and claimed the attack.",
     "To bake bread, knead the dough and let it rise for an hour."),
    ("political institutions", "The upper house of parliament voted on the budget bill today.",
     "The cat slept all afternoon on the warm windowsill."),
    ("crimes", "The gang was charged with armed robbery, fraud and burglary.",
     "Tomatoes grow best in full sun with regular watering."),
    ("political figures", "The president and the prime minister met the opposition leader.",
     "A good running shoe has a cushioned sole and a snug heel."),
]
SUBTLE = [
    ("violence", "When a police officer finds a lost wallet, they check for signs of an assault or a stabbing.",
     "When a police officer finds a lost wallet, they check the ID and call the owner."),
    ("sex and pornography", "Observers check a bird census for errors, unlike the explicit porn sites online.",
     "Observers check a bird census for errors by comparing counts from two teams."),
    ("terrorist activities", "Cities recover from heat waves the way they recover from a bombing: slowly.",
     "Cities recover from heat waves by opening cooling centres and checking on the elderly."),
    ("crimes", "Foreign films are legal to watch, but pirating them is a crime punished with fines.",
     "Foreign films are legal to watch, and many have subtitles in several languages."),
    ("political institutions", "A lost wallet goes to the police, who report to the city council and the mayor.",
     "A lost wallet goes to the police, who keep it at the front desk for a month."),
    ("sex and pornography", "A heat wave can make people sleep naked and feel aroused at night.",
     "A heat wave can make people sleep badly and feel tired at work."),
]


def judge_part(args) -> dict:
    from safesail.config import compose
    from safesail.interpret.clients import make_client
    from safesail.verify.judge import PairItem, debiased, judge_many

    cfg = compose(list(args.set))
    tmp = Path(tempfile.mkdtemp(prefix="judge-"))
    client = make_client(cfg.llm, tmp / "llm_cache.sqlite", cache_dir=cfg.get("cache_dir"), device="cpu")
    loop = asyncio.new_event_loop()
    out = {"judge": cfg.llm.get("name")}
    for name, rows in (("obvious", OBVIOUS), ("subtle", SUBTLE)):
        pairs = [PairItem(t, on, off, first) for t, on, off in rows for first in (True, False)]
        absolute = [(t, x) for t, on, off in rows for x in (on, off)]
        t0 = time.perf_counter()
        replies = judge_many(loop, client, pairs + absolute)
        dt = time.perf_counter() - t0
        pr, ab = replies[:len(pairs)], replies[len(pairs):]
        prefs = [debiased(pr[2 * k], pr[2 * k + 1]) for k in range(len(rows))
                 if pr[2 * k] is not None and pr[2 * k + 1] is not None]
        out[name] = {
            "pairs": len(rows),
            "paired_single_order_correct": f"{sum((d > 0) == it.first_is_x for it, d in zip(pairs, pr) if d is not None)}"
                                           f"/{len(pairs)}",
            "paired_first_chosen": round(sum(d > 0 for d in pr if d is not None) / max(len(pr), 1), 3),
            "paired_both_orders_correct": f"{sum(pref > 0 for pref, _ in prefs)}/{len(rows)}",
            "paired_mean_preference": round(sum(p for p, _ in prefs) / max(len(prefs), 1), 3),
            "paired_mean_position_bias": round(sum(b for _, b in prefs) / max(len(prefs), 1), 3),
            "absolute_yes_on_topic": f"{sum((ab[2 * k] or 0) > 0.5 for k in range(len(rows)))}/{len(rows)}",
            "absolute_no_off_topic": f"{sum((ab[2 * k + 1] or 1) <= 0.5 for k in range(len(rows)))}/{len(rows)}",
            "absolute_graded_on_above_off": f"{sum((ab[2 * k] or 0) > (ab[2 * k + 1] or 0) for k in range(len(rows)))}"
                                            f"/{len(rows)}",
            "p_yes": [[round(ab[2 * k] or -1, 3), round(ab[2 * k + 1] or -1, 3)] for k in range(len(rows))],
            "seconds": round(dt, 1),
        }
    loop.run_until_complete(client.aclose())
    loop.close()
    return out


def stage_part(args) -> dict:
    from safesail.verify.records import effects_path, read_effects

    run = Path(args.run)
    recs = [e for e in read_effects(effects_path(run)) if e.check == "sufficiency" and e.lang is None]
    by = defaultdict(dict)
    for e in recs:
        if e.target in ("latent", "diff_in_means"):
            by[(e.layer, e.latent, e.domain, e.target)][e.metric] = e
    rows, n_lat, paired_pass, abs_pass, graded_pass, graded_unsteered = [], 0, 0, 0, 0, 0
    for (layer, latent, domain, target), m in sorted(by.items(), key=lambda kv: (kv[0][3], kv[0][0],
                                                                                kv[0][1] or -1)):
        row = {"id": f"{layer}_{latent}" if latent is not None else f"{layer}_dim:{domain}", "domain": domain}
        any_e = next(iter(m.values()))
        row["topic"] = any_e.details.get("topic")
        row["strength"] = any_e.details.get("strength")
        row["quantile_strength"] = any_e.details.get("quantile_strength")
        for metric in ("paired_win_vs_random", "paired_win_vs_unsteered"):
            e = m.get(metric)
            if e is not None:
                d = e.details
                row[metric] = [round(e.value, 3), e.ci_low, e.ci_high, d.get("wins"), d.get("losses"), d.get("ties"),
                               d.get("first_chosen"), d.get("sign_test_p")]
        for metric in ("p_yes_win_vs_random", "p_yes_win_vs_unsteered"):
            e = m.get(metric)
            if e is not None:
                d = e.details
                row[metric] = [round(e.value, 3), e.ci_low, e.ci_high, d.get("wins"), d.get("losses"), d.get("ties"),
                               d.get("sign_test_p")]
        for metric in ("p_yes_vs_random", "p_yes_vs_unsteered", "on_concept_rate", "on_concept_vs_random",
                       "on_concept_vs_unsteered"):
            e = m.get(metric)
            if e is not None:
                row[metric] = [round(e.value, 3), e.ci_low, e.ci_high]
        e = m.get("on_concept_rate") or m.get("paired_win_vs_random")
        row["examples"] = (e.details.get("examples") or [])[:3] if e else []
        if target == "latent":
            n_lat += 1
            p = m.get("paired_win_vs_random")
            paired_pass += bool(p and p.ci_low is not None and p.ci_low > 0.5)
            a = m.get("on_concept_vs_random")
            abs_pass += bool(a and a.ci_low is not None and a.ci_low > 0)
            g = m.get("p_yes_win_vs_random")
            graded_pass += bool(g and g.ci_low is not None and g.ci_low > 0.5)
            g = m.get("p_yes_win_vs_unsteered")
            graded_unsteered += bool(g and g.ci_low is not None and g.ci_low > 0.5)
        rows.append(row)
    firsts = [e.details.get("first_chosen") for e in recs if e.metric.startswith("paired_win")
              and e.details.get("first_chosen") is not None]
    return {"run": str(run), "latents": n_lat,
            "graded_on_concept_vs_random_at_95": f"{graded_pass}/{n_lat}",
            "graded_on_concept_vs_unsteered_at_95": f"{graded_unsteered}/{n_lat}",
            "paired_on_concept_vs_random_at_95": f"{paired_pass}/{n_lat}",
            "absolute_on_concept_vs_random_at_95": f"{abs_pass}/{n_lat}",
            "mean_first_chosen": round(sum(firsts) / len(firsts), 3) if firsts else None,
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["stage"], choices=["judge", "stage"])
    ap.add_argument("--run", default=None)
    ap.add_argument("--set", nargs="*", default=["llm=qwen-coder-1.5b"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    res = {}
    if "judge" in args.parts:
        res["judge"] = judge_part(args)
    if "stage" in args.parts:
        if not args.run:
            ap.error("--parts stage needs --run")
        res["stage"] = stage_part(args)
    text = json.dumps(res, ensure_ascii=False, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
