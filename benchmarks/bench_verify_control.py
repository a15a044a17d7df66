"""Several random latents as the sufficiency control, on a finished verify run (issue 15, session 5).

A latent "steers on-concept" when its steered answers beat a random latent's of the same norm (the
pre-registered log-odds criterion, `safesail.verify.stats`). With ONE random latent per latent, a random
direction that breaks its own answers decides the comparison (the session-4 demo's two passes). This
script re-uses a finished run's records (the strength each latent kept, its steered and unsteered p(yes)) and
generates the answers of ``--k`` random latents per named latent at that strength on the same neutral
queries (`verify.random_latents`: the first is the run's own control, so its p(yes) is checked against the
record), asks the run's judge, and prints the criterion against the first random latent and against the mean
p(yes) of all k (the control `verify.random_latents: k` gives). Run it on a COPY of a run (the judge's cache
is written).

    python benchmarks/bench_verify_control.py --run /tmp/vs5/runs/demo4v --latents 0_483 0_4253 --k 3
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from safesail.interpret.scoring.metrics import bootstrap_interval
from safesail.jsonl import iter_jsonl
from safesail.verify.stats import logodds_diffs


def _ci(vals: list[float], n_boot: int = 200) -> tuple[float, float, float]:
    lo, hi = bootstrap_interval(lambda idx: sum(vals[i] for i in idx) / len(idx), len(vals), n_boot, seed=0)
    return sum(vals) / len(vals), lo, hi


def _records(run: Path, names: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in iter_jsonl(run / "verify" / "effects.jsonl"):
        if r.get("target") != "latent" or r.get("check") != "sufficiency" or r.get("metric") != "on_concept_rate":
            continue
        name = f"{r['hook'].split('.')[1]}_{r['latent']}"
        if name in names:
            out[name] = r
    for r in iter_jsonl(run / "verify" / "effects.jsonl"):
        if r.get("target") == "random_latent" and r.get("metric") == "on_concept_rate":
            name = f"{r['hook'].split('.')[1]}_{(r.get('details') or {}).get('control_for')}"
            if name in out:
                out[name].setdefault("random", []).append(r)
    return out


def rebuild_units(root: Path, overrides: list[str], recs: dict[str, dict], n_random: int = 1) -> SimpleNamespace:
    """A finished run's source model, SAEs, query sets, judge client (on the run's cache) and Verifier, and for each
    latent's sufficiency record (`recs`, in their order) its unit steered at the strength the run kept, with
    `n_random` random control latents: `units` = [(name, unit, record)]."""
    from safesail.config import compose
    from safesail.interpret.clients import make_client
    from safesail.models import load_model
    from safesail.rundir import RunDir
    from safesail.train.pairs import load_pairs
    from safesail.train.selection import chosen_sae_dirs
    from safesail.verify.checks import Verifier
    from safesail.verify.stage import VerifySettings, load_steerable, plan_latents, query_sets
    from safesail.verify.wave import latent_unit, set_strength

    cfg = compose([f"run.root={root.parent}", f"run.name={root.name}", *overrides])
    s = VerifySettings.from_cfg(cfg)
    rd = RunDir.from_cfg(cfg)
    sae_dirs = chosen_sae_dirs(cfg, rd.root)
    plan, exclude = plan_latents(rd, dataclasses.replace(s, max_latents=10_000), sorted(sae_dirs))
    items = {f"{p['hook'].split('.')[1]}_{p['latent']}": p for p in plan}
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.get("cache_dir"))
    saes = {h: load_steerable(rd, h, f, lm.device) for h, f in sae_dirs.items()}
    sets, _ = query_sets(load_pairs(cfg.select.get("pairs")), s, lm.tokenizer, cfg.model.get("system_prompt"))
    client = make_client(cfg.llm, rd.interpret / "llm_cache.sqlite", cache_dir=cfg.get("cache_dir"), device="cpu")
    units = []
    for name, r in recs.items():
        p, det = items[name], r["details"]
        u = latent_unit(name, saes[p["hook"]], p, sets[p["domain"]], det["strength"], exclude[p["hook"]], s.seed, [],
                        det.get("resid_norm"), det.get("positions", "all"), n_random)
        set_strength(u, det["strength"])
        units.append((name, u, r))
    return SimpleNamespace(sets=sets, loop=asyncio.new_event_loop(), client=client,
                           verifier=Verifier(lm, s.checks(), None), units=units)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--latents", nargs="+", required=True, help="<layer>_<index> of latents the run verified")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=["experiment=demo"], help="config overrides the run was made with")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from safesail.verify.judge import judge_many

    root = Path(args.run)
    recs = _records(root, args.latents)
    if not recs:
        print("none of these latents has sufficiency records in the run", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    run = rebuild_units(root, args.set, recs, args.k)
    v, loop, client, units = run.verifier, run.loop, run.client, run.units
    reqs = [(u.qs.neutral, u.qs.nlangs, iv) for _, u, _ in units for iv in [u.control, *u.more_controls]]
    answers = v.answers_many(reqs)
    out, k = {}, 0
    for name, u, r in units:
        topic = r["details"]["topic"]
        ans = answers[k:k + args.k]
        k += args.k
        texts = [t for a in ans for t in a.texts]
        ps = judge_many(loop, client, [(topic, t) for t in texts])
        n = len(u.qs.neutral)
        per = [ps[j * n:(j + 1) * n] for j in range(args.k)]
        st, un = r["details"]["p_yes"], r["details"]["unsteered_p_yes"]
        rec_first = r["random"][0]["details"]["p_yes"]
        mean = [sum(c[q] for c in per) / args.k for q in range(n)]
        row = {"latent": name, "topic": topic, "strength": r["details"]["strength"],
               "control_latents": [u.control_latent, *u.more_control_latents],
               "first_matches_record": sum(abs(a - b) < 1e-3 for a, b in zip(per[0], rec_first)),
               "empty_answers": [sum(not t.strip() for t in a.texts) for a in ans]}
        for tag, ctrl in [("record_first", rec_first)] + [(f"random{j}", c) for j, c in enumerate(per)] + \
                         [(f"mean_of_{args.k}", mean), ("unsteered", un)]:
            m, lo, hi = _ci(logodds_diffs(st, ctrl))
            row[tag] = {"lo": round(m, 3), "ci": [round(lo, 3), round(hi, 3)], "pass": lo > 0}
        row["examples"] = {f"random{j}": a.texts[:4] for j, a in enumerate(ans)}
        out[name] = row
        print(f"{name} ({topic[:40]}) strength {row['strength']}, controls {row['control_latents']}, "
              f"empty {row['empty_answers']}, first control = record on {row['first_matches_record']}/{n}")
        for tag in ["record_first"] + [f"random{j}" for j in range(args.k)] + [f"mean_of_{args.k}", "unsteered"]:
            x = row[tag]
            print(f"   vs {tag:12s} {x['lo']:+.2f} [{x['ci'][0]:+.2f}, {x['ci'][1]:+.2f}]{' PASS' if x['pass'] else ''}")
    loop.run_until_complete(client.aclose())
    loop.close()
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
