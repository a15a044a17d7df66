"""Refusal under interventions on a second source model (issue 15): a finished `safesail verify` run
of `experiment=qwen05b-refusal` (Qwen2.5-Coder-0.5B-Instruct), read side by side with SmolLM2's.

Parts (``--parts``):

* ``stage``: no model. From the run's `verify/baseline.json` and `effects.jsonl`: the unmodified
  model's refusal rate (phrase check) and refusal-opening log-prob per domain and language, on the
  concept queries and their neutral twins; per unit (single latents, diff-in-means directions) the
  refusal changes under ablation / project-out (on the concept queries) and under steering / adding
  (on the neutral twins), log-prob and rate, with the stage's bootstrap intervals; per (hook, domain)
  the ratio of the direction's project-out effect to the largest single-latent ablation effect.
* ``flips``: loads the source model and the run's SAE and regenerates, exactly as the stage does
  (its query sets, its diff-in-means directions at the norm the stage recorded), the answers under the
  direction's project-out / add and under each latent's ablation, and prints every query whose
  phrase-check verdict flips (base answer beside the intervened one), so the flips can be read.
* ``head``: the unembedding of ``--model`` (experiment name, default qwen05b-refusal) on a [48, 1, d] input,
  contiguous and as the strided slice transformers passes (`logits_to_keep`), with and without the hook
  `load_model` adds (`models/loading.contiguous_head_input`): seconds and peak RSS (run it in a fresh
  process: the peak is the process's, so the contiguous case goes first).

    python benchmarks/bench_second_source.py --parts stage flips --run /tmp/ss/runs/qwen05b
    python benchmarks/bench_second_source.py --parts head --model qwen05b-refusal
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _fig(e) -> list | None:
    if e is None:
        return None
    r = lambda x: None if x is None else round(x, 3)
    return [r(e.value), r(e.ci_low), r(e.ci_high)]


def stage_part(args) -> dict:
    from safesail.verify.records import effects_path, read_effects

    root = Path(args.run)
    base = json.loads((root / "verify" / "baseline.json").read_text(encoding="utf-8"))
    rows = []
    for dom, d in sorted(base["domains"].items()):
        for lang, g in sorted(d["per_lang"].items()):
            rows.append({"domain": dom, "lang": lang, "n": g["n"], "concept_rate": g["refusal_rate"],
                         "neutral_rate": g.get("neutral_refusal_rate"), "concept_lp": round(g["refusal_logprob"], 3),
                         "neutral_lp": None if g.get("neutral_refusal_logprob") is None
                         else round(g["neutral_refusal_logprob"], 3)})
    print(f"baseline ({base.get('model')}, {base.get('max_new_tokens')} tokens):")
    for r in rows:
        print(f"  {r['domain']:<12} {r['lang']}  n={r['n']}  concept {r['concept_rate']:.2f} (lp {r['concept_lp']})"
              f"  neutral {r['neutral_rate'] if r['neutral_rate'] is None else round(r['neutral_rate'], 2)}")
    units = defaultdict(dict)
    for e in read_effects(effects_path(root)):
        if e.check != "refusal" and e.metric not in ("answer_changed",):
            continue
        key = (e.hook, e.target, e.latent if e.target != "diff_in_means" else None, e.domain)
        units[key][(e.metric, e.lang)] = e
    out_units = []
    for (hook, target, latent, dom), m in sorted(units.items(), key=lambda kv: (kv[0][1], kv[0][3], str(kv[0][2]))):
        if target == "random_latent":
            continue
        u = {"hook": hook, "target": target, "latent": latent, "domain": dom,
             "answer_changed": _fig(m.get(("answer_changed", None)))}
        for kind in ("ablate", "steer"):
            for what in ("logprob", "rate"):
                u[f"{what}_{kind}"] = _fig(m.get((f"refusal_{what}_change_{kind}", None)))
                u[f"{what}_{kind}_by_lang"] = {lang: _fig(m.get((f"refusal_{what}_change_{kind}", lang)))
                                               for lang in ("en", "zh", "hi") if (f"refusal_{what}_change_{kind}", lang) in m}
        out_units.append(u)
        name = f"L{hook.split('.')[1]} {'#' + str(latent) if latent is not None else 'diff-in-means'} {dom}"
        print(f"  {name:<28} ablate/project-out lp {u['logprob_ablate']} rate {u['rate_ablate']}"
              f" | steer/add lp {u['logprob_steer']} rate {u['rate_steer']}")
    ratios = {}
    for u in out_units:
        if u["target"] != "diff_in_means" or not u["logprob_ablate"]:
            continue
        lat = [abs(x["logprob_ablate"][0]) for x in out_units if x["target"] == "latent" and x["hook"] == u["hook"]
               and x["logprob_ablate"] and x["logprob_ablate"][0] is not None]
        if lat and max(lat) > 0:
            ratios[f"{u['hook']}:{u['domain']}"] = round(abs(u["logprob_ablate"][0]) / max(lat), 2)
    print("direction project-out / largest single-latent ablation (|refusal log-prob change|):", ratios)
    return {"baseline": rows, "units": out_units, "direction_to_best_latent": ratios}


def flips_part(args) -> dict:
    from omegaconf import OmegaConf

    from safesail.config import compose
    from safesail.models import load_model
    from safesail.rundir import RunDir
    from safesail.train.pairs import load_pairs
    from safesail.train.selection import chosen_sae_dirs
    from safesail.verify.checks import Verifier
    from safesail.verify.directions import diff_in_means
    from safesail.verify.interventions import (
        DirectionEdit,
        Intervention,
        LatentEdit,
        scaled,
    )
    from safesail.verify.records import effects_path, read_effects
    from safesail.verify.stage import VerifySettings, load_steerable, query_sets

    root = Path(args.run)
    cfg = OmegaConf.load(root / "config.yaml")
    # verify keys added since the run take the current defaults (the run's own values win)
    cfg.verify = OmegaConf.merge(compose([f"experiment={cfg.experiment_name}"]).verify, cfg.verify)
    s = VerifySettings.from_cfg(cfg)
    rd = RunDir(root)
    effects = read_effects(effects_path(root))
    norms = {(e.hook, e.domain): e.details["norm"] for e in effects if e.target == "diff_in_means" and "norm" in e.details}
    # the latents whose ablation changed some phrase-check verdict in the stage (all of them with --all-latents)
    latents = sorted({(e.hook, e.latent, e.domain) for e in effects if e.target == "latent" and (
        args.all_latents or e.metric == "refusal_rate_change_ablate" and e.lang is None
        and any(x not in (None, 0) for x in (e.value, e.ci_low, e.ci_high)))}, key=str)
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.get("cache_dir"))
    sets, refs = query_sets(load_pairs(cfg.select.get("pairs")), s, lm.tokenizer, cfg.model.get("system_prompt"))
    saes = {h: load_steerable(rd, h, f, lm.device) for h, f in chosen_sae_dirs(cfg, root).items()}
    v = Verifier(lm, s.checks(), None)
    doms = sorted({d for _, d in norms} | {d for _, _, d in latents})
    v.baselines([sets[d] for d in doms])
    reqs, what = [], []
    for (hook, dom), norm in sorted(norms.items()):
        sae, qs = saes[hook], sets[dom]
        vec = scaled(diff_in_means(lm, sae.hook, *refs[dom]).float(), norm)
        for mode, prompts, langs in (("project_out", qs.concept, qs.langs), ("add", qs.neutral, qs.nlangs)):
            reqs.append((prompts, langs, Intervention([sae], direction_edits=[DirectionEdit(sae.hook.layer, vec, mode)])))
            what.append((f"{hook}:{dom}:diff-in-means {mode}", dom, "concept" if mode == "project_out" else "neutral"))
    for hook, latent, dom in latents:
        sae, qs = saes[hook], sets[dom]
        reqs.append((qs.concept, qs.langs, Intervention([sae], [LatentEdit(sae.hook.layer, latent, "ablate")])))
        what.append((f"{hook}:{dom}:#{latent} ablate", dom, "concept"))
    out = []
    for (name, dom, side), ans in zip(what, v.answers_many(reqs)):
        qs = sets[dom]
        ref = qs.base_concept if side == "concept" else qs.base_neutral
        langs = qs.langs if side == "concept" else qs.nlangs
        n_up = n_down = 0
        for k, (b, a) in enumerate(zip(ref.refused, ans.refused)):
            if b == a:
                continue
            n_up += a and not b
            n_down += b and not a
            out.append({"unit": name, "side": side, "lang": langs[k], "refused_before": b, "refused_after": a,
                        "lp_before": round(ref.refusal_lp[k], 2), "lp_after": round(ans.refusal_lp[k], 2),
                        "query": lm.tokenizer.decode((qs.concept if side == "concept" else qs.neutral)[k],
                                                     skip_special_tokens=True).split("user\n")[-1].split("\nassistant")[0],
                        "before": ref.texts[k], "after": ans.texts[k]})
        print(f"{name}: {sum(ref.refused)}/{len(ref.refused)} refused before, {sum(ans.refused)} after "
              f"({n_up} start refusing, {n_down} stop)", flush=True)
    for f in out:
        print(json.dumps(f, ensure_ascii=False))
    return {"flips": out}


def head_part(args) -> dict:
    import resource
    import time

    from safesail.config import compose
    from safesail.models import load_model

    cfg = compose([f"experiment={args.model}"])
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.get("cache_dir"))
    head = lm.model.get_output_embeddings()
    x = torch.randn(48, 103, head.in_features, dtype=lm.dtype)
    out = {}
    for name, inp, hooked in (("contiguous", x[:, -1:].contiguous(), False), ("strided, with the hook", x[:, -1:], True),
                              ("strided, no hook", x[:, -1:], False)):
        t0 = time.perf_counter()
        with torch.no_grad():
            head(inp) if hooked else torch.nn.functional.linear(inp, head.weight, head.bias)
        out[name] = {"s": round(time.perf_counter() - t0, 3),
                     "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        print(lm.name, name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["stage"], choices=["stage", "flips", "head"])
    ap.add_argument("--run", help="a run directory with a finished (or partial) verify/ (stage, flips)")
    ap.add_argument("--model", default="qwen05b-refusal", help="head: the experiment whose source model to load")
    ap.add_argument("--all-latents", action="store_true", help="flips: every latent's ablation (default: those "
                    "whose ablation changed the refusal rate in the stage)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    fig = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads", "load": os.getloadavg(), "command": sys.argv}
    for part in args.parts:
        fig[part] = {"stage": stage_part, "flips": flips_part, "head": head_part}[part](args)
    fig["load_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(fig, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
