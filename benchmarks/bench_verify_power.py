"""Power of the sufficiency comparison (issue 15): what each statistic reads on the same judged answers.

Reads a finished `safesail verify` run (``--run``) whose sufficiency records keep the judge's
per-query p(yes) (`details.p_yes`, `details.unsteered_p_yes`, the random latent's `details.p_yes`;
session 4 on) and recomputes, per latent, on the first ``--first`` neutral queries (the earlier
stage's 12: the concept queries' twins) and on all of them:

* ``win``: share of queries on which the steered answer's p(yes) beats the random latent's (ties
  0.5), bootstrap 95% interval, sign-test p; passes when the interval is above 0.5 (sessions 2-3);
* ``dp``: mean difference of p(yes), bootstrap interval; passes above 0;
* ``lo``: mean difference of the judge's log-odds (`safesail.verify.stats`), bootstrap interval and
  the paired t interval; passes above 0 (the criterion pre-registered for session 4);

each against the random latent and against the unsteered answer, with the latent's output score
(`promoted_logprob_change`: how much adding it raises its own top direct-logit tokens' next-token
log-prob) beside, and the share of latents that pass under each. The bootstrap uses the stage's
own resampling (`scoring.metrics.bootstrap_interval`, seed 0) so the "all" column equals the
records' intervals.

    python benchmarks/bench_verify_power.py --run /tmp/vs4/runs/demo --first 12

``--output-table``: each latent's output effect (verify's (a): output score, next-token KL, largest direct
logit) beside its two verdicts, and how well each output figure predicts them (Spearman, AUC); issue 15
session 6 (the literature's "output score" angle).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from safesail.interpret.scoring.metrics import bootstrap_interval
from safesail.jsonl import iter_jsonl
from safesail.verify.judge import sign_test_p
from safesail.verify.stats import logodds_diffs, t_interval


def _ci(vals: list[float], n_boot: int) -> tuple[float | None, float | None, float | None]:
    if not vals:
        return None, None, None
    lo, hi = bootstrap_interval(lambda idx: sum(vals[i] for i in idx) / len(idx), len(vals), n_boot, seed=0)
    return sum(vals) / len(vals), lo, hi


def statistics(a: list, b: list, n_boot: int) -> dict:
    """The three paired statistics of a (steered) against b (a control), per query."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    win = [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in pairs]
    w, l_ = win.count(1.0), win.count(0.0)
    m, lo, hi = _ci(win, n_boot)
    out = {"n": len(pairs), "win": m, "win_ci": [lo, hi], "wins": w, "losses": l_, "sign_p": sign_test_p(w, l_),
           "win_pass": lo is not None and lo > 0.5}
    m, lo, hi = _ci([x - y for x, y in pairs], n_boot)
    out.update(dp=m, dp_ci=[lo, hi], dp_pass=lo is not None and lo > 0)
    d = logodds_diffs([x for x, _ in pairs], [y for _, y in pairs])
    m, lo, hi = _ci(d, n_boot)
    out.update(lo=m, lo_ci=[lo, hi], lo_t=list(t_interval(d)), lo_pass=lo is not None and lo > 0)
    return out


def per_latent(run: Path, control: str = "mean") -> list[dict]:
    """`control`: the random-latent p(yes) per query compared with: `mean` over the run's random latents
    (verify.random_latents), `first` (the one random latent of a random_latents=1 run), or `k<j>` the mean of
    the first j."""
    recs = list(iter_jsonl(run / "verify" / "effects.jsonl"))
    by: dict[tuple, dict] = defaultdict(dict)
    for r in recs:
        if r.get("target") == "random_latent":
            key = (r["hook"], (r.get("details") or {}).get("control_for"), "latent", None)
            if r["check"] == "sufficiency" and r["metric"] == "on_concept_rate":   # in the order drawn
                by[key].setdefault("random_ps", []).append(r["details"].get("p_yes"))
            continue
        key = (r["hook"], r.get("latent"), r["target"], r.get("domain") if r["target"] == "diff_in_means" else None)
        d = by[key]
        d.setdefault("domain", r.get("domain"))
        det = r.get("details") or {}
        if r["check"] == "sufficiency" and r["metric"] == "on_concept_rate" and r.get("lang") is None:
            d.update(p=det.get("p_yes"), unsteered_p=det.get("unsteered_p_yes"), topic=det.get("topic"),
                     examples=det.get("examples"), strength=det.get("strength"))
        if r["check"] == "output_effect" and r["metric"] == "promoted_logprob_change":
            d["output_score"] = r.get("value")
            d["output_ci"] = [r.get("ci_low"), r.get("ci_high")]
            d["promoted"] = det.get("tokens")
        if r["check"] == "output_effect" and r["metric"] == "next_token_kl":
            d["kl"] = r.get("value")
        if r["check"] == "output_effect" and r["metric"] == "direct_logit_max":
            d["dla_max"] = r.get("value")
    out = []
    for (hook, latent, target, _), d in by.items():
        if d.get("p") is None:
            continue
        ps = d.get("random_ps") or []
        k = 1 if control == "first" else int(control[1:]) if control.startswith("k") else len(ps)
        if ps and k:
            ps = ps[:k]
            d["random_p"] = [None if any(p[q] is None for p in ps) else sum(p[q] for p in ps) / len(ps)
                             for q in range(len(ps[0]))]
        out.append({"hook": hook, "latent": latent, "target": target, **d})
    return sorted(out, key=lambda x: (x["target"] != "latent", x["hook"], x["latent"] or -1))


def _f(x, nd=2):
    return "-" if x is None else f"{x:+.{nd}f}" if isinstance(x, float) else str(x)


def _ci_s(ci):
    return "[-, -]" if ci[0] is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def report(rows: list[dict], first: int, n_boot: int) -> dict:
    summary = defaultdict(lambda: defaultdict(int))
    lines = ["| unit | topic | out. score | n | vs random: win (W/L) / dp / log-odds | vs unsteered: win / log-odds |",
             "|---|---|---|---|---|---|"]
    result = []
    for r in rows:
        name = f"L{r['hook'].split('.')[1]} #{r['latent']}" if r["target"] == "latent" else \
            f"L{r['hook'].split('.')[1]} dim {r['domain']}"
        for tag, k in ((f"first {first}", first), ("all", None)):
            p = r["p"][:k]
            vs_u = statistics(p, r["unsteered_p"][:k], n_boot)
            vs_r = statistics(p, (r.get("random_p") or [])[:k], n_boot) if r.get("random_p") else None
            if r["target"] == "latent":
                for stat in ("win", "dp", "lo"):
                    summary[tag][f"{stat}_vs_random"] += bool(vs_r and vs_r[f"{stat}_pass"])
                    summary[tag][f"{stat}_vs_unsteered"] += bool(vs_u[f"{stat}_pass"])
                    summary[tag][f"{stat}_both"] += bool(vs_r and vs_r[f"{stat}_pass"] and vs_u[f"{stat}_pass"])
                summary[tag]["latents"] += 1
            rs = "-" if vs_r is None else (f"{vs_r['win']:.2f} {_ci_s(vs_r['win_ci'])} ({vs_r['wins']}/{vs_r['losses']})"
                                           f" / {_f(vs_r['dp'])} {_ci_s(vs_r['dp_ci'])} / **{_f(vs_r['lo'])}** "
                                           f"{_ci_s(vs_r['lo_ci'])}{' PASS' if vs_r['lo_pass'] else ''}")
            us = (f"{vs_u['win']:.2f} ({vs_u['wins']}/{vs_u['losses']}) / {_f(vs_u['lo'])} {_ci_s(vs_u['lo_ci'])}"
                  f"{' PASS' if vs_u['lo_pass'] else ''}")
            lines.append(f"| {name} ({tag}) | {(r.get('topic') or '')[:40]} | {_f(r.get('output_score'))} | "
                         f"{vs_u['n']} | {rs} | {us} |")
            result.append({"unit": name, "subset": tag, "output_score": r.get("output_score"),
                           "vs_random": vs_r, "vs_unsteered": vs_u})
    print("\n".join(lines))
    print()
    for tag, s in summary.items():
        n = s["latents"]
        print(f"{tag}: of {n} latents, pass vs random / vs unsteered / both: "
              + "; ".join(f"{stat} {s[stat + '_vs_random']}/{s[stat + '_vs_unsteered']}/{s[stat + '_both']}"
                          for stat in ("win", "dp", "lo")))
    # does the output score predict the effect? (rank correlation with the log-odds effect vs random, all)
    pts = [(x["output_score"], x["vs_random"]["lo"]) for x in result
           if x["subset"] == "all" and x["vs_random"] and x["output_score"] is not None]
    if len(pts) >= 3:
        rho = _spearman([a for a, _ in pts], [b for _, b in pts])
        print(f"output score vs log-odds effect vs random (all queries): Spearman {rho:+.2f} over {len(pts)} latents")
    return {"rows": result, "summary": {k: dict(v) for k, v in summary.items()}}


def _rank(v):
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    for k, i in enumerate(order):
        r[i] = float(k)
    return r


def _spearman(a, b):
    ra, rb = _rank(a), _rank(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return num / den if den else 0.0


def _auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a passing latent's score > a failing one's), ties 0.5 (Mann-Whitney AUC); None without both groups."""
    if not pos or not neg:
        return None
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))


def output_table(rows: list[dict], n_boot: int) -> dict:
    """Does a latent's output effect (verify's (a), already in the records) predict its sufficiency verdict?
    Per latent: the output score (`promoted_logprob_change`: mean change of its top direct-logit tokens'
    next-token log-prob when it is added at the kept strength), the same score per nat of next-token KL (how
    much of the change is the latent's own tokens rather than a broken distribution), the largest direct logit,
    and the pre-registered log-odds effect against the random control and the unsteered answer (all queries).
    Then the rank correlation of each output figure with each effect and the AUC of each for the verdicts."""
    lines = ["| latent | topic | strength | out. score [95%] | KL | score / KL | max DLA | top promoted | "
             "log-odds vs random | log-odds vs unsteered |", "|---|---|---|---|---|---|---|---|---|---|"]
    pts = []
    for r in rows:
        if r["target"] != "latent" or r.get("output_score") is None:
            continue
        vs_u = statistics(r["p"], r["unsteered_p"], n_boot)
        vs_r = statistics(r["p"], r["random_p"], n_boot) if r.get("random_p") else None
        kl = r.get("kl")
        ratio = r["output_score"] / kl if kl else None
        ci = r.get("output_ci") or [None, None]
        pts.append({"latent": f"L{r['hook'].split('.')[1]} #{r['latent']}", "output_score": r["output_score"],
                    "score_per_kl": ratio, "kl": kl, "dla_max": r.get("dla_max"),
                    "lo_random": vs_r["lo"] if vs_r else None, "pass_random": bool(vs_r and vs_r["lo_pass"]),
                    "lo_unsteered": vs_u["lo"], "pass_unsteered": bool(vs_u["lo_pass"])})
        x = pts[-1]
        lines.append(f"| {x['latent']} | {(r.get('topic') or '')[:32]} | {r.get('strength')} | {_f(x['output_score'])} "
                     f"{_ci_s(ci)} | {_f(kl)} | {_f(ratio)} | {_f(x['dla_max'], 1)} | "
                     f"{' '.join(repr(t) for t in (r.get('promoted') or [])[:4])} | "
                     f"{_f(x['lo_random'])}{' PASS' if x['pass_random'] else ''} | "
                     f"{_f(x['lo_unsteered'])}{' PASS' if x['pass_unsteered'] else ''} |")
    print("\n".join(lines))
    out = {"latents": pts, "relations": []}
    for feat in ("output_score", "score_per_kl", "kl", "dla_max"):
        for eff, verdict in (("lo_random", "pass_random"), ("lo_unsteered", "pass_unsteered")):
            xs = [(p[feat], p[eff], p[verdict]) for p in pts if p[feat] is not None and p[eff] is not None]
            if len(xs) < 3:
                continue
            rho = _spearman([a for a, _, _ in xs], [b for _, b, _ in xs])
            auc = _auc([a for a, _, v in xs if v], [a for a, _, v in xs if not v])
            out["relations"].append({"feature": feat, "effect": eff, "spearman": rho, "auc": auc, "n": len(xs)})
            print(f"{feat} vs {eff}: Spearman {rho:+.2f}; AUC for {verdict} "
                  f"{'-' if auc is None else f'{auc:.2f}'} ({sum(v for *_, v in xs)} of {len(xs)} pass)")
    return out


def _lse(lp: dict, names) -> float:
    import math

    return math.log(sum(math.exp(lp[n]) for n in names if n in lp) or 1e-300)


def judged_texts(run: Path, topic: str) -> dict[float, str]:
    """p(yes) (rounded as the records keep it) -> answer text, for every answer the judge was asked about
    `topic` (read back from the run's LLM response cache)."""
    import math
    import sqlite3

    from safesail.verify.judge import NO, YES

    out = {}
    con = sqlite3.connect(str(run / "interpret" / "llm_cache.sqlite"))
    needle = f"Topic: {topic}\nIs the following text about the topic?"
    for req, resp in con.execute("select request, response from responses where method = 'prompt_logprobs' "
                                 "and instr(request, 'Is the following text about the topic') > 0"):
        prompt = json.loads(req)["params"]["prompt"]
        if needle not in prompt:
            continue
        text = prompt.split("\nText: ", 1)[1].rsplit("<|im_end|>", 1)[0]
        lp = (json.loads(resp).get("next_logprobs") or [{}])[-1]
        d = max(-50.0, min(50.0, _lse(lp, YES) - _lse(lp, NO)))
        out[round(1 / (1 + math.exp(-d)), 6)] = text
    con.close()
    return out


def read(run: Path, rows: list[dict], names: list[str]) -> None:
    """Every steered, random-latent and unsteered answer of the named latents (`<layer>_<index>`), per query."""
    for r in rows:
        if r["target"] != "latent" or f"{r['hook'].split('.')[1]}_{r['latent']}" not in names:
            continue
        texts = judged_texts(run, r["topic"])
        print(f"\n## L{r['hook'].split('.')[1]} #{r['latent']} ({r['topic']}), strength {r.get('strength')}")
        for k, (ps, pr, pu) in enumerate(zip(r["p"], r.get("random_p") or [None] * len(r["p"]), r["unsteered_p"])):
            print(f"[{k}] steered  p={ps}: {texts.get(ps, '?')[:160]}")
            print(f"     random   p={pr}: {texts.get(pr, '?')[:160]}")
            print(f"     unsteered p={pu}: {texts.get(pu, '?')[:160]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--first", type=int, default=12)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--control", default="mean", help="random control per query: mean (of the run's random latents), "
                                                       "first, or k<j> (mean of the first j)")
    ap.add_argument("--examples", action="store_true", help="print each latent's example steered answers")
    ap.add_argument("--read", nargs="*", default=[], help="print every answer of these latents (<layer>_<index>)")
    ap.add_argument("--output-table", action="store_true", help="per latent: its output effect beside its sufficiency "
                                                                "verdicts, and how well the one predicts the other")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = per_latent(Path(args.run), args.control)
    if not rows:
        print("no sufficiency records with per-query p(yes) (run verify with this session's code)", file=sys.stderr)
        return 1
    if args.read:
        read(Path(args.run), rows, args.read)
        return 0
    if args.output_table:
        res = output_table(rows, args.n_boot)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        return 0
    res = report(rows, args.first, args.n_boot)
    if args.examples:
        for r in rows:
            print(f"\nL{r['hook'].split('.')[1]} #{r['latent']} ({r.get('topic')}), strength {r.get('strength')}:")
            for t in r.get("examples") or []:
                print("   ", json.dumps(t, ensure_ascii=False))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
