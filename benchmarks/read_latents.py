"""Read a finished run's explained latents next to their evidence, and print issue 13's figures.

For every explained latent: its top explain-split segments (peak tokens bracketed), the
explanation, the simulation score with its shuffled and constant controls, the tags with
their LLM and pair evidence; then the figures: own-beats-shuffled rate, median score, share
passing 0.2, copied examples (equal to a prompt example, and retried), tagged latents per
domain with their top tokens. A reader writes the right / vague / wrong verdicts from this.

    python benchmarks/read_latents.py /tmp/et/runs/demo [--segments 4] [--json figures.json]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path


def main(argv: list[str]) -> None:
    from safesail.interpret.explain import load_tasks
    from safesail.interpret.prompts.explain import EXAMPLES, PROMPT_VERSION, bracketed_text
    from safesail.interpret.scoring.records import read_scores, scores_path
    from safesail.jsonl import last_per_latent
    from safesail.rundir import RunDir

    root = Path(argv[0])
    n_seg = int(argv[argv.index("--segments") + 1]) if "--segments" in argv else 4
    rd = RunDir(root)
    # the current prompt's records only: an older prompt's are stale (explain would redo them), and their
    # latents may no longer be collected
    expl = {k: v for k, v in last_per_latent(rd.interpret / "explanations.jsonl").items()
            if v.get("prompt_version") == PROMPT_VERSION}
    tags = last_per_latent(rd.interpret / "tags.jsonl")
    scores = read_scores(scores_path(rd.root), kinds=["simulation"])
    tasks = {}
    for hook in sorted({h for h, _ in expl}):
        for t in load_tasks(rd, hook, sorted(j for h, j in expl if h == hook)):
            tasks[(hook, t.latent)] = t

    examples = {e.answer.lower() for e in EXAMPLES}
    rows = []
    for key in sorted(expl):
        e, t, tg = expl[key], tasks.get(key), tags.get(key, {})
        sc = scores.get((key[0], key[1], "simulation"))
        segs = [bracketed_text(s["tokens"], s["acts"], t.max_act).replace("⏎", "\\n") for s in t.segments[:n_seg]] \
            if t else []
        top_tokens = Counter()
        for s in (t.segments if t else []):
            peak = max(range(len(s["acts"])), key=lambda i: s["acts"][i])
            top_tokens[s["tokens"][peak].strip() or repr(s["tokens"][peak])] += 1
        pairs = (tg.get("evidence") or {}).get("pairs") or {}
        llm = (tg.get("evidence") or {}).get("llm") or {}
        rows.append({"hook": key[0], "latent": key[1], "explanation": e.get("explanation"), "status": e["status"],
                     "reason": e.get("reason"), "copied": len(e.get("copied") or []),
                     "score": None if sc is None else sc.value,
                     "shuffled": None if sc is None else sc.control_shuffled,
                     "constant": None if sc is None else sc.control_constant,
                     "beats": None if sc is None else sc.beats_shuffled,
                     "tags": tg.get("tags", []), "llm": llm.get("domains"), "llm_status": llm.get("status"),
                     "pairs_pass": [d for d, v in pairs.items() if v.get("passes")],
                     "pairs_best": max(pairs.items(), key=lambda kv: kv[1].get("effect", 0))[0] if pairs else None,
                     "top_tokens": [w for w, _ in top_tokens.most_common(5)], "segments": segs})
    for r in rows:
        print(f"\n== {r['hook']} #{r['latent']}: {r['explanation']!r} ({r['status']}"
              f"{', ' + r['reason'] if r['reason'] else ''}{', retried after a copy' if r['copied'] else ''})")
        print(f"   simulation {_f(r['score'])} vs shuffled {_f(r['shuffled'])}, constant {_f(r['constant'])}; "
              f"tags {r['tags']} (LLM {r['llm']} [{r['llm_status']}], pairs pass {r['pairs_pass']}, "
              f"strongest pair domain {r['pairs_best']})")
        print(f"   top tokens {r['top_tokens']}")
        for s in r["segments"]:
            print(f"   | {s}")

    ok = [r for r in rows if r["status"] == "ok"]
    scored = [r for r in ok if r["score"] is not None]
    vals = [r["score"] for r in scored]
    with_ctrl = [r for r in scored if r["beats"] is not None]
    per_domain: dict[str, list] = {}
    for r in rows:
        for d in r["tags"]:
            per_domain.setdefault(d, []).append(f"{r['hook']}#{r['latent']} {r['top_tokens'][:3]}")
    figs = {"explained": len(rows), "ok": len(ok), "scored": len(scored),
            "beats_shuffled": f"{sum(r['beats'] for r in with_ctrl)} / {len(with_ctrl)}",
            "beats_shuffled_rate": round(sum(r["beats"] for r in with_ctrl) / len(with_ctrl), 3) if with_ctrl else None,
            "median_score": round(statistics.median(vals), 3) if vals else None,
            "mean_score": round(statistics.mean(vals), 3) if vals else None,
            "pass_0.2": f"{sum(v >= 0.2 for v in vals)} / {len(scored)}",
            "equal_to_an_example": sum(1 for r in ok if str(r["explanation"]).lower() in examples),
            "copied_then_retried": sum(1 for r in rows if r["copied"]),
            "failed_copied_example": sum(1 for r in rows if r["reason"] == "copied_example"),
            "explain_failures": dict(Counter(r["reason"] for r in rows if r["status"] != "ok")),
            "tagger_replies": dict(Counter(r["llm_status"] for r in rows)),
            "tagged_per_domain": {d: len(v) for d, v in per_domain.items()}, "tagged": per_domain}
    print("\n" + json.dumps(figs, indent=1, ensure_ascii=False))
    if "--json" in argv:
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"figures": figs, "latents": rows}, indent=1,
                                                                   ensure_ascii=False))


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main(sys.argv[1:])
