"""Is the explanation or the steering what sufficiency misses? (issue 15, session 7)

A latent "steers on-concept" when the judge finds its steered answers more about the latent's EXPLANATION than a
random latent's of the same norm (the pre-registered log-odds criterion, `safesail.verify.stats`). When an
explanation is wrong or narrow ("the word 'must'", "language and culture" for a latent tagged terror), the
steered answer can move toward the latent's domain and still lose. This script re-uses a finished run's
records (the strength each latent kept, its p(yes)) and regenerates, at that strength on the same neutral
queries, the steered, the random-latent and the unsteered answers, then asks the run's judge about two topics:

- `explanation`: the record's own topic (the judge's cache of the run answers these; the p(yes) are checked
  against the record, so the regenerated answers are the run's);
- `domain`: the description of the latent's domain the stage uses when there is no explanation
  (`wave.DOMAIN_TOPICS`, e.g. "terrorism, extremist groups or attacks on the public").

and prints the criterion for both, against the random latent and against the unsteered answer. Run it on a COPY
of a run (the judge's cache is written).

    python benchmarks/bench_verify_topic.py --run /tmp/s7/copy/demo --out /tmp/s7/topic.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench_verify_control import _ci, rebuild_units   # the control script's interval and run loading

from safesail.jsonl import iter_jsonl
from safesail.verify.stats import logodds_diffs


def _sufficiency_records(run: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in iter_jsonl(run / "verify" / "effects.jsonl"):
        if r.get("target") == "latent" and r.get("check") == "sufficiency" and r.get("metric") == "on_concept_rate":
            out[f"{r['hook'].split('.')[1]}_{r['latent']}"] = r
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--latents", nargs="*", default=None, help="<layer>_<index>; default: every verified latent")
    ap.add_argument("--set", nargs="*", default=["experiment=demo"], help="config overrides the run was made with")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from safesail.verify.judge import judge_many
    from safesail.verify.wave import DOMAIN_TOPICS

    root = Path(args.run)
    if not (root / "verify" / "effects.jsonl").is_file():
        print(f"{root} has no verify/effects.jsonl: give --run a run directory that `safesail verify` has run in",
              file=sys.stderr)
        return 1
    recs = _sufficiency_records(root)
    if args.latents:
        recs = {k: v for k, v in recs.items() if k in set(args.latents)}
    if not recs:
        print("the run has no sufficiency records of these latents: run `safesail verify` on it first", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    run = rebuild_units(root, args.set, dict(sorted(recs.items())))
    v, loop, client, units, sets = run.verifier, run.loop, run.client, run.units, run.sets
    domains = sorted({u.qs.domain for _, u, _ in units})
    reqs = [(u.qs.neutral, u.qs.nlangs, iv) for _, u, _ in units for iv in (u.steer, u.control)]
    reqs += [(sets[d].neutral, sets[d].nlangs, None) for d in domains]
    answers = v.answers_many(reqs)
    base = {d: answers[2 * len(units) + j] for j, d in enumerate(domains)}
    t_gen = time.perf_counter() - t0
    # every (topic, text) of every latent in one judge batch: steered, random, unsteered x explanation, domain
    jobs: list[tuple[str, str]] = []
    spans = {}
    for j, (name, u, r) in enumerate(units):
        st, ct, un = answers[2 * j].texts, answers[2 * j + 1].texts, base[u.qs.domain].texts
        for tag, topic in (("explanation", r["details"]["topic"]), ("domain", DOMAIN_TOPICS[u.qs.domain])):
            for cond, texts in (("steered", st), ("random", ct), ("unsteered", un)):
                spans[(name, tag, cond)] = (len(jobs), len(jobs) + len(texts))
                jobs += [(topic, t) for t in texts]
    ps = judge_many(loop, client, jobs)
    out, passes = {}, {("explanation", "random"): 0, ("explanation", "unsteered"): 0, ("domain", "random"): 0,
                       ("domain", "unsteered"): 0, ("domain", "both"): 0, ("explanation", "both"): 0}
    for j, (name, u, r) in enumerate(units):
        got = {key[1:]: ps[a:b] for key, (a, b) in spans.items() if key[0] == name}
        rec = r["details"]["p_yes"]
        same = sum(abs(a - b) < 1e-3 for a, b in zip(got[("explanation", "steered")], rec))
        row = {"latent": name, "domain": u.qs.domain, "explanation": r["details"]["topic"],
               "strength": r["details"]["strength"], "steered_matches_record": f"{same}/{len(rec)}",
               "examples": answers[2 * j].texts[:3]}
        line = [f"{name:8s} {u.qs.domain:11s} {r['details']['topic'][:34]:34s} s {row['strength']:<5g} rec {same}/{len(rec)}"]
        for tag in ("explanation", "domain"):
            ok = []
            for ctrl in ("random", "unsteered"):
                m, lo, hi = _ci(logodds_diffs(got[(tag, "steered")], got[(tag, ctrl)]))
                row[f"{tag}_vs_{ctrl}"] = {"mean": round(m, 3), "ci": [round(lo, 3), round(hi, 3)], "pass": lo > 0}
                passes[(tag, ctrl)] += lo > 0
                ok.append(lo > 0)
                line.append(f"{tag[:4]} vs {ctrl[:4]} {m:+.2f} [{lo:+.2f}, {hi:+.2f}]{'*' if lo > 0 else ' '}")
            passes[(tag, "both")] += all(ok)
        out[name] = row
        print(" | ".join(line), flush=True)
    n = len(units)
    summary = {f"{t}_vs_{c}": f"{k}/{n}" for (t, c), k in passes.items()}
    print("passes:", summary)
    print(f"generation {t_gen:.0f} s, all {time.perf_counter() - t0:.0f} s, {len(jobs)} judge requests")
    loop.run_until_complete(client.aclose())
    loop.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "latents": out}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
