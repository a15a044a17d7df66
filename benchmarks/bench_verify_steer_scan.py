"""Steering strength scan on a run directory: read the steered answers yourself (issue 15, sufficiency).

For chosen latents of a finished run (`--latents 7_700 14_158 ...`), steer a few English neutral
queries of the bundled pairs with the latent's decoder direction scaled to a multiple of the hook's
residual-stream norm (`--alphas`: the added vector's norm is alpha x the median per-token norm of the
residual stream after that block on those prompts, first position excluded), on every position
(prompt and answer), next to a random latent of the same SAE at the same norm, greedy answers of
`--new-tokens` tokens. `--positions all answer` steers each row both on every position and only where
the answer is generated (`interventions.POSITIONS`). Prints every answer and writes them (with the
quantile-unit strength each alpha corresponds to) to `--out` as JSON, for reading side by side;
`--judge FILE` afterwards asks the judge (the `llm` group) p(yes) of every answer of such a file about its
latent's explanation (`--set llm=...`), and prints the mean per (latent, alpha, kind, positions).

    OMP_NUM_THREADS=1 python benchmarks/bench_verify_steer_scan.py --run /tmp/vs/runs/demo \
        --latents 7_700 7_4156 14_158 --alphas 0.25 0.5 1 2 --queries 4 --out /tmp/vs/scan.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch


def judge_file(path: Path, args) -> int:
    """p(yes) of every answer of a scan file about its latent's explanation; means per condition."""
    import asyncio
    from collections import defaultdict

    from safesail.config import compose
    from safesail.interpret.clients import make_client
    from safesail.jsonl import last_per_latent
    from safesail.verify.judge import judge_many
    from safesail.verify.stats import logit

    run = Path(args.run)
    cfg = compose([*args.set, f"run.root={run.parent}", f"run.name={run.name}"])
    topic = {}
    for f in [*(args.explanations or []), run / "interpret" / "explanations.jsonl"]:   # the run's own win
        expl = last_per_latent(Path(f))
        topic.update({f"{h.split('.')[1]}_{i}": e.get("explanation") for (h, i), e in expl.items()})
    data = json.loads(path.read_text())
    rows = [m for m in data["rows"] if m["latent"] is not None and m["alpha"] in args.alphas]   # --alphas picks
    loop = asyncio.new_event_loop()
    client = make_client(cfg.llm, run / "interpret" / "llm_cache.sqlite", cache_dir=cfg.get("cache_dir"))
    t0 = time.perf_counter()
    ps = judge_many(loop, client, [(topic[m["latent"]], m["text"]) for m in rows])
    loop.run_until_complete(client.aclose())
    groups = defaultdict(list)
    for m, p in zip(rows, ps):
        m["p_yes"] = p
        groups[(m["latent"], m["alpha"], m["kind"], m.get("positions", "all"))].append((m["query"], p))
    print(f"judged {len(rows)} answers in {time.perf_counter() - t0:.0f} s")
    print("| latent | alpha | positions | mean logit p(yes) latent | control | latent - control (per query) |")
    print("|---|---|---|---|---|---|")
    for (lat, a, kind, pos), vals in sorted(groups.items()):
        if kind != "latent":
            continue
        ctrl = dict(groups.get((lat, a, "control", pos), []))
        mine = dict(vals)
        d = [logit(mine[q]) - logit(ctrl[q]) for q in mine if q in ctrl and mine[q] is not None and ctrl[q] is not None]
        ml = sum(logit(p) for p in mine.values() if p is not None) / max(len(mine), 1)
        mc = sum(logit(p) for p in ctrl.values() if p is not None) / max(len(ctrl), 1) if ctrl else float("nan")
        print(f"| {lat} | {a} | {pos} | {ml:+.2f} | {mc:+.2f} | {sum(d) / max(len(d), 1):+.2f} (n {len(d)}) |")
    path.with_suffix(".judged.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory through collect (its SAEs and latent stats)")
    ap.add_argument("--latents", nargs="+", required=True, help="layer_index ids, e.g. 7_700")
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--queries", type=int, default=4, help="English neutral queries (spread over domains)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-control", action="store_true", help="skip the random-latent control rows")
    ap.add_argument("--positions", nargs="+", default=["all"], choices=["all", "answer"])
    ap.add_argument("--judge", default=None, help="judge the answers of this --out file instead of generating")
    ap.add_argument("--explanations", nargs="*", default=[],
                    help="explanations.jsonl files for latents the run has no explanation of (its own are preferred)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", nargs="*", default=["experiment=demo"], help="config overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.judge:
        return judge_file(Path(args.judge), args)

    from safesail.chat import encode_chat
    from safesail.config import compose
    from safesail.models import load_model
    from safesail.rundir import RunDir
    from safesail.train.pairs import load_pairs
    from safesail.train.selection import chosen_sae_dirs
    from safesail.verify.generation import generate_full
    from safesail.verify.interventions import (
        DirectionEdit,
        Intervention,
        parse_neuron_id,
    )
    from safesail.verify.stage import load_steerable
    from safesail.verify.steering import residual_norm

    run = Path(args.run)
    cfg = compose([*args.set, f"run.root={run.parent}", f"run.name={run.name}"])
    rd = RunDir.from_cfg(cfg)
    dirs = chosen_sae_dirs(cfg, rd.root)
    t0 = time.perf_counter()
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.get("cache_dir"))
    by_layer = {}
    for hook, folder in dirs.items():
        s = load_steerable(rd, hook, folder, lm.device)
        by_layer[s.hook.layer] = s
    pairs = [p for p in load_pairs(cfg.select.get("pairs")) if p.lang == "en"]
    doms = sorted({p.domain for p in pairs})
    chosen = []
    while len(chosen) < args.queries:
        for d in doms:
            left = [p for p in pairs if p.domain == d and p not in chosen]
            if left and len(chosen) < args.queries:
                chosen.append(left[0])
    sysp = cfg.model.get("system_prompt")
    prompts = [encode_chat(lm.tokenizer, p.neutral_query, sysp) for p in chosen]

    rows, ivs, meta = [], [], []
    base = generate_full(lm, prompts, args.new_tokens, 48).ids
    for q, b in zip(chosen, base):
        meta.append({"latent": None, "alpha": 0, "query": q.neutral_query, "kind": "unsteered",
                     "text": lm.tokenizer.decode(b, skip_special_tokens=True)})
    norms = {}
    for ident in args.latents:
        layer, latent = parse_neuron_id(ident)
        s = by_layer[layer]
        if layer not in norms:
            norms[layer] = residual_norm(lm, s.hook, prompts)
        R = norms[layer]
        rng = random.Random(f"scan:{layer}:{latent}")
        ctrl = rng.randrange(s.n_latents)
        for a in args.alphas:
            for kind, j in (("latent", latent), ("control", ctrl)):
                if kind == "control" and args.no_control:
                    continue
                d = s.direction(j).float()
                for pos in args.positions:
                    iv = Intervention([s], direction_edits=[DirectionEdit(layer, d / d.norm() * a * R)], positions=pos)
                    for q, p in zip(chosen, prompts):
                        rows.append(p)
                        ivs.append(iv)
                        qs = (a * R / (s.scales[latent] * float(s.direction(latent).norm()))
                              if latent in s.scales else None)
                        meta.append({"latent": ident, "alpha": a, "kind": kind, "control_latent": j,
                                     "positions": pos, "query": q.neutral_query, "quantile_strength": qs,
                                     "resid_norm": R})
    g = generate_full(lm, rows, args.new_tokens, 48, ivs=ivs)
    for m, ids in zip(meta[len(chosen):], g.ids):
        m["text"] = lm.tokenizer.decode(ids, skip_special_tokens=True)
    for m in meta:
        qs = m.get("quantile_strength")
        print(f"[{m['latent']} a={m['alpha']} {m['kind']} {m.get('positions', '')}{'' if qs is None else f' q={qs:.1f}'}] "
              f"{m['query'][:40]!r} -> {m['text']!r}")
    print(f"residual norms: {norms}; {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps({"norms": norms, "rows": meta}, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
