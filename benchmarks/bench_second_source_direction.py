"""The residual-stream refusal direction (Arditi et al. 2024; `safesail/verify/residual_direction.py`) on a
source model, on the held-out half of the bundled pairs (issue 15, second source model).

The pairs of every (domain, language) are split by position: even -> train, odd -> test; the direction is
computed on the train half's first `--train-per-cell` pairs of each cell, the layer chosen on its last
`--select-per-cell` (disjoint when the cell has enough pairs).

1. **Direction**: per block, the mean residual input at the last prompt position over the train half's
   concept queries minus their neutral twins (`--contrast pairs`, default), or over the train prompts the
   unedited model refuses minus those it answers (`--contrast refusal`: concept and neutral queries together,
   labelled by the phrase check on a greedy answer).
2. **Layer**: on `--select-per-cell` train pairs per (domain, language), every candidate layer's direction
   is ablated everywhere (refusal log-prob of the concept queries; KL of the neutral queries' next-token
   distribution) and added at its layer (refusal log-prob of the neutral queries); `--select-by ablate`
   keeps the layer whose ablation lowers refusal most with KL <= `--max-kl` (the paper's rule), `add` the
   one whose addition raises the neutral queries' refusal most (for a model that refuses nothing).
3. **Measure** on the test half (`--test-per-cell` pairs per cell, all by default), greedy `--tokens`-token
   answers: the concept queries unedited / direction ablated / a random direction ablated / direction added
   / random added; the neutral twins unedited / direction added / random added (the random direction: a
   seeded Gaussian vector of the direction's norm); refusal rate (phrase check) and mean refusal-opening
   log-prob per condition, and the change against unedited per query, with seeded percentile bootstrap
   intervals, overall and per language; the KL of the neutral queries' next-token distribution under each
   ablation; the answers whose verdict flips.

    OMP_NUM_THREADS=1 python benchmarks/bench_second_source_direction.py --model qwen05b-refusal --out q.json
    OMP_NUM_THREADS=1 python benchmarks/bench_second_source_direction.py --model demo --select-by add --out s.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch


def _split(pairs, per_cell_test: int | None, per_cell_select: int, langs, per_cell_train: int | None = None):
    cells: dict = {}
    for p in pairs:
        if p.lang in langs:
            cells.setdefault((p.domain, p.lang), []).append(p)
    train, test, select = [], [], []
    for key in sorted(cells):
        ps = cells[key]
        tr, te = ps[0::2], ps[1::2]
        train += tr if per_cell_train is None else tr[:per_cell_train]
        select += tr[-per_cell_select:] if per_cell_select else []   # the train half's last pairs
        test += te if per_cell_test is None else te[:per_cell_test]
    return train, select, test


def _ci(vals: list[float], n_boot: int, seed: int = 0) -> list:
    from safesail.interpret.scoring.metrics import bootstrap_interval

    if not vals:
        return [None, None, None]
    lo, hi = bootstrap_interval(lambda idx: sum(vals[i] for i in idx) / len(idx), len(vals), n_boot, seed=seed)
    r = lambda x: None if x is None else round(float(x), 3)
    return [r(sum(vals) / len(vals)), r(lo), r(hi)]


class Runner:
    def __init__(self, lm, tokens: int, batch: int):
        self.lm, self.tokens, self.batch, self.memo = lm, tokens, batch, {}

    def answers(self, prompts, langs, edit=None) -> dict:
        from safesail.verify.generation import generate_full
        from safesail.verify.refusal import (
            from_opening_logprobs,
            is_refusal,
            opening_ids,
        )

        t0 = time.perf_counter()
        with edit.apply(self.lm.model) if edit is not None else contextlib.nullcontext():
            g = generate_full(self.lm, prompts, self.tokens, self.batch,
                              continuations=opening_ids(self.lm.tokenizer, langs, self.memo))
        texts = [self.lm.tokenizer.decode(a, skip_special_tokens=True) for a in g.ids]
        print(f"  {len(prompts)} answers in {time.perf_counter() - t0:.0f} s", flush=True)
        return {"texts": texts, "lp": from_opening_logprobs(g.continuations),
                "refused": [bool(is_refusal(t)) for t in texts], "first": g.first}


def _summary(cond: dict, base: dict | None, langs: list[str], n_boot: int) -> dict:
    out = {}
    for lang in [None, *sorted(set(langs))]:
        idx = [k for k, x in enumerate(langs) if lang is None or x == lang]
        rate = [float(cond["refused"][k]) for k in idx]
        lp = [cond["lp"][k] for k in idx]
        g = {"n": len(idx), "refusal_rate": _ci(rate, n_boot), "refusal_logprob": _ci(lp, n_boot)}
        if base is not None:
            g["rate_change"] = _ci([rate[j] - float(base["refused"][k]) for j, k in enumerate(idx)], n_boot)
            g["logprob_change"] = _ci([lp[j] - base["lp"][k] for j, k in enumerate(idx)], n_boot)
            g["flips_to_refusal"] = sum(cond["refused"][k] and not base["refused"][k] for k in idx)
            g["flips_to_answer"] = sum(base["refused"][k] and not cond["refused"][k] for k in idx)
        out[lang or "all"] = g
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen05b-refusal", help="experiment whose source model to load")
    ap.add_argument("--contrast", default="pairs", choices=["pairs", "refusal"])
    ap.add_argument("--select-by", default="ablate", choices=["ablate", "add"])
    ap.add_argument("--select-per-cell", type=int, default=4)
    ap.add_argument("--test-per-cell", type=int, default=None)
    ap.add_argument("--train-per-cell", type=int, default=None, help="train pairs per cell for the direction")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="candidate layers (default: all < 0.8 L)")
    ap.add_argument("--layer", type=int, default=None, help="skip the selection: use this layer")
    ap.add_argument("--max-kl", type=float, default=0.1)
    ap.add_argument("--coef", type=float, default=1.0, help="added vector = coef x the direction")
    ap.add_argument("--langs", nargs="+", default=["en", "zh", "hi"])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concept-add", action=argparse.BooleanOptionalAction, default=True,
                    help="also add the direction (and the random one) to the concept queries")
    ap.add_argument("--dirs", type=Path, help="a .pt file: the directions are read from it when it exists, "
                    "else computed and saved there")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("safesail.verify.residual_direction").setLevel(logging.INFO)

    from safesail.chat import encode_chat
    from safesail.config import compose
    from safesail.models import load_model
    from safesail.train.pairs import load_pairs
    from safesail.verify.generation import next_token_logprobs
    from safesail.verify.residual_direction import (
        ResidualDirection,
        residual_directions,
        select_layer,
    )

    fig = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads", "load": os.getloadavg(), "command": sys.argv}
    t_start = time.perf_counter()
    cfg = compose([f"experiment={args.model}"])
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.get("cache_dir"))
    sp = cfg.model.get("system_prompt")
    enc = lambda q: encode_chat(lm.tokenizer, q, sp)
    train, select, test = _split(load_pairs(cfg.select.get("pairs")), args.test_per_cell, args.select_per_cell,
                                 args.langs, args.train_per_cell)
    fig.update(model=lm.name, n_train=len(train), n_select=len(select), n_test=len(test))
    print(f"{lm.name}: {len(train)} train pairs ({len(select)} for the layer), {len(test)} test pairs", flush=True)
    run = Runner(lm, args.tokens, args.batch)

    t0 = time.perf_counter()
    if args.dirs is not None and args.dirs.is_file():
        saved = torch.load(args.dirs)
        dirs = saved["dirs"]
        fig["contrast_counts"] = saved.get("counts")
    elif args.contrast == "pairs":
        pos, neg = [enc(p.concept_query) for p in train], [enc(p.neutral_query) for p in train]
    else:
        qs = [enc(p.concept_query) for p in train] + [enc(p.neutral_query) for p in train]
        ls = [p.lang for p in train] * 2
        ans = run.answers(qs, ls)
        pos = [q for q, r in zip(qs, ans["refused"]) if r]
        neg = [q for q, r in zip(qs, ans["refused"]) if not r]
        fig["contrast_counts"] = {"refused": len(pos), "answered": len(neg)}
        print(f"  train prompts refused {len(pos)}, answered {len(neg)}", flush=True)
    if args.dirs is None or not args.dirs.is_file():
        dirs = residual_directions(lm, pos, neg, batch_size=args.batch)
        if args.dirs is not None:
            torch.save({"dirs": dirs, "counts": fig.get("contrast_counts")}, args.dirs)
    fig["direction_s"] = round(time.perf_counter() - t0, 1)
    print(f"  directions in {fig['direction_s']} s", flush=True)
    fig["direction_norms"] = [round(float(x), 2) for x in dirs.norm(dim=-1)]

    t0 = time.perf_counter()
    if args.layer is None:
        sc = [enc(p.concept_query) for p in select]
        sn = [enc(p.neutral_query) for p in select]
        sl = [p.lang for p in select]
        layer, scores, base = select_layer(lm, dirs, sc, sl, sn, sl, args.layers, args.max_kl, batch_size=args.batch)
        table = [vars(s) for s in scores]
        if args.select_by == "add":
            layer = max(scores, key=lambda s: s.refusal_added).layer
        fig["selection"] = {"by": args.select_by, "layer": layer, "unedited": base,
                            "scores": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                                       for r in table]}
        for r in table:
            print(f"  layer {r['layer']:>2} |r| {r['norm']:.2f}  refusal ablated {r['refusal_ablated']:.3f}  "
                  f"KL {r['kl_neutral']:.4f}  neutral refusal added {r['refusal_added']:.3f}", flush=True)
        print(f"  unedited: concept {base['refusal_concept']:.3f}, neutral {base['refusal_neutral']:.3f}; "
              f"layer {layer}", flush=True)
    else:
        layer = args.layer
        fig["selection"] = {"by": "given", "layer": layer}
    fig["selection_s"] = round(time.perf_counter() - t0, 1)

    r = dirs[layer]
    g = torch.Generator().manual_seed(args.seed)
    rnd = torch.randn(r.shape[0], generator=g)
    rnd = rnd * (r.norm() / rnd.norm())
    fig["layer"], fig["norm"] = layer, round(float(r.norm()), 3)
    edits = {"ablate": ResidualDirection(r, "ablate"), "random_ablate": ResidualDirection(rnd, "ablate"),
             "add": ResidualDirection(r, "add", layer=layer, coef=args.coef),
             "random_add": ResidualDirection(rnd, "add", layer=layer, coef=args.coef)}
    tc, tn, tl = [enc(p.concept_query) for p in test], [enc(p.neutral_query) for p in test], [p.lang for p in test]
    t0 = time.perf_counter()
    conds = {}
    print("concept queries:", flush=True)
    conds["concept"] = run.answers(tc, tl)
    for name in ("ablate", "random_ablate") + (("add", "random_add") if args.concept_add else ()):
        conds[f"concept_{name}"] = run.answers(tc, tl, edits[name])
    print("neutral twins:", flush=True)
    conds["neutral"] = run.answers(tn, tl)
    for name in ("add", "random_add"):
        conds[f"neutral_{name}"] = run.answers(tn, tl, edits[name])
    kl = {}
    for name in ("ablate", "random_ablate"):
        with edits[name].apply(lm.model):
            nxt = next_token_logprobs(lm, tn, args.batch)
        base_next = conds["neutral"]["first"]
        kl[name] = _ci([float(x) for x in (base_next.exp() * (base_next - nxt)).sum(-1)], args.n_boot)
    fig["measure_s"] = round(time.perf_counter() - t0, 1)
    fig["neutral_kl_under_ablation"] = kl
    res = {}
    for name, c in conds.items():
        base = None if name in ("concept", "neutral") else conds[name.split("_")[0]]
        res[name] = _summary(c, base, tl, args.n_boot)
    fig["conditions"] = res
    print(json.dumps({k: v["all"] for k, v in res.items()}, indent=None), flush=True)
    for lang in sorted(set(tl)):
        print(lang, json.dumps({k: {m: v[lang].get(m) for m in ("refusal_rate", "rate_change", "logprob_change")}
                                for k, v in res.items()}), flush=True)
    print("KL neutral (ablate, random ablate):", kl, flush=True)
    flips = []
    for name, c in conds.items():
        if name in ("concept", "neutral"):
            continue
        side = name.split("_")[0]
        base = conds[side]
        for k, (b, a) in enumerate(zip(base["refused"], c["refused"])):
            if b != a:
                flips.append({"cond": name, "lang": tl[k], "to_refusal": a,
                              "query": (test[k].concept_query if side == "concept" else test[k].neutral_query),
                              "before": base["texts"][k], "after": c["texts"][k]})
    fig["flips"] = flips
    fig["examples"] = {name: [{"query": (test[k].concept_query if name.startswith("concept") else test[k].neutral_query),
                               "answer": c["texts"][k]} for k in range(0, len(test), max(1, len(test) // 6))]
                       for name, c in conds.items()}
    fig["wall_s"] = round(time.perf_counter() - t_start, 1)
    fig["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    fig["load_after"] = os.getloadavg()
    print(f"wall {fig['wall_s']} s, peak {fig['peak_rss_gib']} GiB, load {fig['load_after']}", flush=True)
    if args.out:
        for c in conds.values():
            c.pop("first", None)
        fig["answers"] = {name: c["texts"] for name, c in conds.items()}
        fig["test_queries"] = [{"id": p.id, "lang": p.lang} for p in test]
        args.out.write_text(json.dumps(fig, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
