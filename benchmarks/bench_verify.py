"""Causal checks (issue 15): refusal baselines, /api/steer latency, and the verify stage's figures.

Parts (run one or several with --parts):

* ``refusal``: the source model's refusal rate on the bundled concept queries (phrase check on a
  greedy answer, and the mean log-probability of a refusal opening), per domain and language, beside
  the same figures on their neutral twins; ``--models`` adds other models (e.g. the embedded
  Qwen2.5-Coder explainer: ``--models smollm2 qwen-coder-0.5b``).
* ``steer``: `/api/steer` latency over HTTP against plain `/api/diagnose` on the same query and answer
  length, interleaved; "cold" asks for the original side afresh (a new query each time, both answers
  generated), "warm" is the page's flow (the original side cached from an earlier steer of that query),
  "steered only" leaves the original out. The DB is the random-SAE one of bench_diagnose.py.
* ``stage``: summarises a finished `safesail verify` run directory (``--run runs/demo``): wall time,
  per tagged latent whether steering is judged on-concept more often than the random-latent control
  (95% interval of the paired difference above 0), ablation effects on refusal, the diff-in-means
  direction beside the best single latents.

* ``steer_ab``: cold steers of the working tree and of an older ``safesail/diagnose/steer.py`` (``--old-src``)
  in one process, interleaved with plain diagnoses (no HTTP): the ratio of each to a diagnose under the
  same load.

* ``scan``: the strength scan of every planned latent of ``--run`` (settings: ``--set``), full and from the top
  down, in one process: rows generated, CPU seconds, and how often the strength kept differs.

* ``speed``: the verify stage's wall time with an older version of the package (``--old-src``: a
  directory holding its ``safesail/``, ``configs/`` and ``data/``, e.g. from
  ``git archive <commit> safesail configs data``; each run starts in its source directory)
  beside the working tree's, on fresh copies of one run directory (``--run``; its ``verify/`` and
  the judge's cached replies are not carried over, so both pay every judge call), one after the other,
  the same ``--set`` overrides for both.

    python benchmarks/bench_verify.py --parts refusal steer --threads 1
    python benchmarks/bench_verify.py --parts stage --run runs/demo
    python benchmarks/bench_verify.py --parts speed --run runs/demo --old-src /tmp/old \
        --set experiment=demo verify.max_latents=2 verify.queries_per_domain=6 verify.reference=false \
        --set-new verify.strength_scan=[]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
MODEL_OVERRIDES = {"smollm2": [], "qwen-coder-0.5b": ["llm=qwen-coder-0.5b"],
                   "qwen-coder-1.5b": ["llm=qwen-coder-1.5b"]}


def load(name: str):
    from safesail.config import compose
    from safesail.models import load_model

    cfg = compose(MODEL_OVERRIDES[name])
    model_cfg = cfg.model if name == "smollm2" else cfg.llm.model
    return cfg, load_model(model_cfg, "cpu", cache_dir=cfg.get("cache_dir"))


def refusal_part(args) -> dict:
    from safesail.chat import encode_chat
    from safesail.train.pairs import load_pairs
    from safesail.verify.generation import generate_batch
    from safesail.verify.refusal import is_refusal, refusal_logprob

    pairs = load_pairs(None)
    if args.per_group:
        kept, count = [], defaultdict(int)
        for p in pairs:
            if count[(p.domain, p.lang)] < args.per_group:
                kept.append(p)
                count[(p.domain, p.lang)] += 1
        pairs = kept
    out = {}
    for name in args.models:
        cfg, lm = load(name)
        sysp = cfg.model.get("system_prompt")
        t0 = time.perf_counter()
        fig: dict = {"n": len(pairs), "groups": {}}
        for side in ("concept", "neutral"):
            prompts = [encode_chat(lm.tokenizer, getattr(p, f"{side}_query"), sysp) for p in pairs]
            answers = generate_batch(lm, prompts, args.new_tokens, args.batch)
            texts = [lm.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            lps = refusal_logprob(lm, prompts, [p.lang for p in pairs])
            for p, t, lp in zip(pairs, texts, lps):
                g = fig["groups"].setdefault(f"{p.domain}/{p.lang}", {"n": 0, "concept_refused": 0,
                                                                      "neutral_refused": 0, "concept_lp": [],
                                                                      "neutral_lp": []})
                if side == "concept":
                    g["n"] += 1
                g[f"{side}_refused"] += int(is_refusal(t))
                g[f"{side}_lp"].append(lp)
            fig[f"{side}_refusal_rate"] = sum(is_refusal(t) for t in texts) / len(texts)
            fig[f"{side}_mean_refusal_logprob"] = statistics.fmean(lps)
            fig[f"{side}_examples"] = texts[:3]
        for g in fig["groups"].values():
            for side in ("concept", "neutral"):
                g[f"{side}_refusal_rate"] = g.pop(f"{side}_refused") / g["n"]
                g[f"{side}_mean_refusal_logprob"] = round(statistics.fmean(g.pop(f"{side}_lp")), 3)
        fig["seconds"] = round(time.perf_counter() - t0, 1)
        out[lm.name] = fig
        print(f"{lm.name}: concept refusal {fig['concept_refusal_rate']:.3f}, neutral {fig['neutral_refusal_rate']:.3f}"
              f" ({len(pairs)} pairs, {fig['seconds']} s)")
        for k, g in sorted(fig["groups"].items()):
            print(f"  {k:<18} n={g['n']:<3} concept {g['concept_refusal_rate']:.2f} (lp {g['concept_mean_refusal_logprob']:.2f})"
                  f"  neutral {g['neutral_refusal_rate']:.2f} (lp {g['neutral_mean_refusal_logprob']:.2f})")
        del lm
    return out


def _steer_setup(args):
    """SmolLM2 with the random-SAE DB of bench_diagnose.py (or --db) and one `add` edit on a middle hook's latent."""
    from bench_diagnose import build_random_db
    from diagnose_helpers import make_engine

    cfg, lm = load("smollm2")
    db_path = args.db or build_random_db(lm, list(cfg.model.layers), REPO / "runs" / "bench-diagnose",
                                         10 * lm.hidden_size, 32)
    engine = make_engine(lm, db_path, max_new_tokens=args.new_tokens, max_new_tokens_limit=256, top=30,
                         system_prompt=cfg.model.system_prompt, threads=args.threads)
    b = engine.saes[len(engine.saes) // 2]
    edits = [{"neuron_id": f"{b.layer}_{int(b.latent_ids[0])}", "mode": "add", "strength": 4.0}]
    return engine, edits, db_path


def steer_part(args) -> dict:
    import httpx

    from diagnose_helpers import LiveServer
    from safesail.diagnose.api.common import ServerSettings
    from safesail.diagnose.server import create_app

    engine, edits, db_path = _steer_setup(args)
    lid = edits[0]["neuron_id"]
    queries = [f"Write a short story about a cat who learns to fly, number {i}." for i in range(args.runs + 2)]
    res = defaultdict(list)
    with LiveServer(create_app(engine, ServerSettings(request_timeout_s=600))) as srv:
        def post(path, body):
            t = time.perf_counter()
            r = httpx.post(srv.url + path, json=body, timeout=600)
            r.raise_for_status()
            return time.perf_counter() - t, r.json()

        post("/api/diagnose", {"query": queries[-1]})  # warm-up
        post("/api/steer", {"query": queries[-1], "edits": edits})
        for q in queries[:args.runs]:
            dt, d = post("/api/diagnose", {"query": q})
            res["diagnose"].append(dt)
            dt, s = post("/api/steer", {"query": q, "edits": edits})          # cold: both sides generated
            res["steer_cold"].append(dt)
            dt, s2 = post("/api/steer", {"query": q, "edits": edits})         # warm: original side cached
            assert s2["original"]["cached"]
            res["steer_warm"].append(dt)
            dt, _ = post("/api/steer", {"query": q, "edits": edits, "include_original": False})
            res["steer_only"].append(dt)
            res["answer_tokens"].append(sum(t["role"] == "answer" for t in d["tokens"]))
    med = {k: statistics.median(v) for k, v in res.items()}
    fig = {"latent": lid, "runs": args.runs, "new_tokens": args.new_tokens, "db": str(db_path),
           **{f"{k}_p50_s": round(v, 3) for k, v in med.items() if k != "answer_tokens"},
           "answer_tokens_p50": med["answer_tokens"],
           "ratio_cold": round(med["steer_cold"] / med["diagnose"], 3),
           "ratio_warm": round(med["steer_warm"] / med["diagnose"], 3),
           "ratio_steered_only": round(med["steer_only"] / med["diagnose"], 3)}
    print(json.dumps(fig, indent=1))
    return fig


def steer_ab_part(args) -> dict:
    """Cold steers of the working tree and of an older steer.py (``--old-src``), in ONE process, interleaved
    with plain diagnoses of the same kind of query (new queries each time, so nothing is cached): the
    engine's compute without HTTP, so the two versions meet the same load; with one thread, CPU seconds
    (process_time) are also given: on a shared machine they are closer to the idle wall time."""
    import importlib.util

    from safesail.diagnose import steer as new_steer

    spec = importlib.util.spec_from_file_location("old_steer", Path(args.old_src) / "safesail/diagnose/steer.py")
    old_steer = importlib.util.module_from_spec(spec)
    sys.modules["old_steer"] = old_steer      # pydantic resolves the module's annotations through it
    spec.loader.exec_module(old_steer)
    engine, edits, db_path = _steer_setup(args)
    res = defaultdict(list)
    for i in range(args.runs + 1):
        q = f"Write a short story about a cat who learns to fly, number {i}."
        times = {}
        t, c = time.perf_counter(), time.process_time()
        engine.diagnose(q)
        times["diagnose"], times["diagnose_cpu"] = time.perf_counter() - t, time.process_time() - c
        for name, mod in (("old", old_steer), ("new", new_steer)) if i % 2 else (("new", new_steer), ("old", old_steer)):
            req = mod.SteerRequest(query=f"{q} ({name})", edits=edits)
            t, c = time.perf_counter(), time.process_time()
            mod.steer(engine, req)
            times[name], times[f"{name}_cpu"] = time.perf_counter() - t, time.process_time() - c
        if i:   # the first round warms up
            for k, v in times.items():
                res[k].append(v)
    med = {k: statistics.median(v) for k, v in res.items()}
    fig = {"runs": args.runs, "new_tokens": args.new_tokens, "old_src": args.old_src,
           **{f"{k}_p50_s": round(v, 3) for k, v in med.items()},
           "ratio_cold_old": round(med["old"] / med["diagnose"], 3),
           "ratio_cold_new": round(med["new"] / med["diagnose"], 3),
           "cpu_ratio_cold_old": round(med["old_cpu"] / med["diagnose_cpu"], 3),
           "cpu_ratio_cold_new": round(med["new_cpu"] / med["diagnose_cpu"], 3),
           "per_run_ratio_new": [round(n / d, 3) for n, d in zip(res["new"], res["diagnose"])],
           "per_run_ratio_old": [round(o / d, 3) for o, d in zip(res["old"], res["diagnose"])]}
    print(json.dumps(fig, indent=1))
    return fig


def stage_part(args) -> dict:
    from safesail.verify.records import effects_path, read_effects

    root = Path(args.run)
    stage = root / "stages" / "verify.json"
    rec = json.loads(stage.read_text()) if stage.is_file() else {"summary": {}}   # a partial run: its done units
    units = [json.loads(line) for line in (root / "verify" / "done.jsonl").read_text().splitlines() if line.strip()]
    effects = read_effects(effects_path(root))
    by = defaultdict(dict)
    for e in effects:
        if e.lang is None:
            by[(e.hook, e.latent, e.target, e.domain if e.target == "diff_in_means" else None)][e.metric] = e
    tagged = [k for k in by if k[2] == "latent"]
    wins, rows = 0, []
    for k in sorted(tagged, key=lambda k: (k[0], k[1])):
        m = by[k]
        d = m.get("on_concept_vs_random")
        win = d is not None and d.ci_low is not None and d.ci_low > 0
        wins += win
        rows.append({"latent": f"{k[0]}:{k[1]}", "domain": m["on_concept_rate"].domain if "on_concept_rate" in m else None,
                     "on_concept": getattr(m.get("on_concept_rate"), "value", None),
                     "vs_random": getattr(d, "value", None), "vs_random_ci": [getattr(d, "ci_low", None),
                                                                              getattr(d, "ci_high", None)],
                     "win": win,
                     "refusal_lp_ablate": _fig(m.get("refusal_logprob_change_ablate")),
                     "refusal_rate_ablate": _fig(m.get("refusal_rate_change_ablate")),
                     "refusal_lp_steer": _fig(m.get("refusal_logprob_change_steer")),
                     "answer_changed": _fig(m.get("answer_changed")),
                     "fires_on_query": (m["answer_changed"].details.get("fires_on_query") if "answer_changed" in m
                                        else None),
                     "promoted_logprob_change": _fig(m.get("promoted_logprob_change")),
                     "segment_loss_change": _fig(m.get("segment_loss_change"))})
    refs = [{"direction": f"{k[0]}:{k[3]}",
             "on_concept": getattr(m.get("on_concept_rate"), "value", None),
             "vs_unsteered": _fig(m.get("on_concept_vs_unsteered")),
             "refusal_lp_ablate": _fig(m.get("refusal_logprob_change_ablate")),
             "refusal_lp_steer": _fig(m.get("refusal_logprob_change_steer")),
             "answer_changed": _fig(m.get("answer_changed")),
             "promoted_logprob_change": _fig(m.get("promoted_logprob_change"))}
            for k, m in by.items() if k[2] == "diff_in_means" and "answer_changed" in m]
    fig = {"run": str(root), "seconds": rec["summary"].get("seconds"), "finished": stage.is_file(),
           "units_done": len(units), "unit_seconds": [u["seconds"] for u in units], "latents": len(tagged),
           "steer_on_concept_wins": wins, "win_share": round(wins / len(tagged), 3) if tagged else None,
           "latents_detail": rows, "diff_in_means": refs}
    print(json.dumps(fig, indent=1, ensure_ascii=False))
    return fig


def speed_part(args) -> dict:
    import shutil
    import sqlite3
    import subprocess

    src = Path(args.run)
    out = {}
    for name, path in (("old", args.old_src), ("new", args.new_src or REPO)):
        root = Path(args.scratch) / f"speed-{name}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(src, root / src.name, ignore=shutil.ignore_patterns("verify", "activations", "wandb"))
        (root / src.name / "stages" / "verify.json").unlink(missing_ok=True)
        cache = root / src.name / "interpret" / "llm_cache.sqlite"
        if cache.is_file():   # drop the judge's cached replies (explain/score/tag replies stay)
            with sqlite3.connect(cache) as db:
                tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
                for t in tables:
                    cols = [r[1] for r in db.execute(f"pragma table_info({t})")]
                    if "request" in cols:
                        db.execute(f"delete from {t} where request like '%Is the%text about the topic%'")
        env = dict(os.environ, PYTHONPATH=str(path), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        stats = root / "time.txt"
        cmd = ["/usr/bin/time", "-f", "%U %S %M", "-o", str(stats), sys.executable, "-m", "safesail", "verify",
               f"run.root={root}", f"run.name={src.name}", *args.set, *(args.set_new if name == "new" else [])]
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(path))
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name}: {proc.stderr[-2000:]}")
        user, system, max_kb = stats.read_text().split()[-3:]
        units = [json.loads(x) for x in (root / src.name / "verify" / "done.jsonl").read_text().splitlines() if x]
        out[name] = {"wall_s": round(dt, 1), "cpu_s": round(float(user) + float(system), 1),
                     "peak_rss_mib": round(int(max_kb) / 1024), "units": len(units), "load_before": load0,
                     "load_after": os.getloadavg()[0]}
        summary = json.loads((root / src.name / "stages" / "verify.json").read_text()).get("summary", {})
        for k in ("seconds", "judge_wait_s", "main_thread_cpu_s", "process_cpu_s", "judge_engine"):
            if k in summary:     # the main thread (SmolLM2) vs all threads (+ the judge), the judge's tokens
                out[name][k] = summary[k]
        print(name, out[name], flush=True)
    out["speedup"] = round(out["old"]["wall_s"] / out["new"]["wall_s"], 2)
    out["cpu_speedup"] = round(out["old"]["cpu_s"] / out["new"]["cpu_s"], 2)   # one thread: ~ the idle ratio
    print(json.dumps(out, indent=1))
    return out


def scan_part(args) -> dict:
    """The strength scan of every planned latent of a run (``--run``), full (every strength in one batch) and
    from the top down (`verify.scan_from_top`), in one process on the same units: generated rows, CPU and wall
    seconds of each, and whether every latent keeps the same strength."""
    import safesail.verify.wave as wave
    from safesail.config import compose
    from safesail.models import load_model
    from safesail.rundir import RunDir
    from safesail.train.pairs import load_pairs
    from safesail.train.selection import chosen_sae_dirs
    from safesail.verify.checks import Verifier
    from safesail.verify.stage import VerifySettings, load_steerable, plan_latents, query_sets
    from safesail.verify.steering import residual_norm

    root = Path(args.run)
    cfg = compose([f"run.root={root.parent}", f"run.name={root.name}", *args.set])
    s = VerifySettings.from_cfg(cfg)
    rd = RunDir.from_cfg(cfg)
    sae_dirs = chosen_sae_dirs(cfg, rd.root)
    plan, exclude = plan_latents(rd, s, sorted(sae_dirs))
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.get("cache_dir"))
    saes = {h: load_steerable(rd, h, f, lm.device) for h, f in sae_dirs.items()}
    sets, _ = query_sets(load_pairs(cfg.select.get("pairs")), s, lm.tokenizer, cfg.model.get("system_prompt"))
    resid = {}
    if s.strength_unit == "residual":
        neutral = [q for d in sorted(sets) for q in sets[d].neutral]
        resid = {h: residual_norm(lm, saes[h].hook, neutral) for h in sorted({p["hook"] for p in plan})}
    v = Verifier(lm, s.checks(), None)
    v.baselines([sets[d] for d in sorted({p["domain"] for p in plan})])
    rows, real = [], wave.generate_full
    wave.generate_full = lambda lm_, prompts, *a, **k: rows.append(len(prompts)) or real(lm_, prompts, *a, **k)
    out = {"latents": len(plan), "strengths": list(s.strength_scan), "scan_queries": s.scan_queries}
    order = ("full", "top") if not args.runs % 2 else ("top", "full")
    for mode in order:
        units = [wave.latent_unit(f"latent:{p['hook']}:{p['latent']}", saes[p["hook"]], p, sets[p["domain"]],
                                  s.strength, exclude[p["hook"]], s.seed, [], resid.get(p["hook"]))
                 for p in plan]
        units = [u for u in units if u is not None]
        rows.clear()
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, len(units), s.wave):      # per wave, as the stage does
            wave.calibrate(v, units[i:i + s.wave], list(s.strength_scan), s.scan_queries, s.fluency_drop,
                           from_top=mode == "top")
        out[mode] = {"wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(time.process_time() - c, 1),
                     "rows": sum(rows), "kept": {u.key: u.extra["strength"] for u in units},
                     "tried": {u.key: [[x["strength"], round(x["fluent"], 3)] for x in u.extra["scan"]] for u in units}}
        print(mode, {k: out[mode][k] for k in ("wall_s", "cpu_s", "rows")}, flush=True)
    wave.generate_full = real
    out["same_strength"] = sum(out["full"]["kept"][k] == out["top"]["kept"][k] for k in out["full"]["kept"])
    out["differs"] = {k: [out["full"]["kept"][k], out["top"]["kept"][k]] for k in out["full"]["kept"]
                      if out["full"]["kept"][k] != out["top"]["kept"][k]}
    out["row_ratio"] = round(out["top"]["rows"] / out["full"]["rows"], 3)
    out["cpu_ratio"] = round(out["top"]["cpu_s"] / out["full"]["cpu_s"], 3)
    print(json.dumps({k: v for k, v in out.items() if k not in ("full", "top")}, indent=1))
    return out


def _fig(e):
    return None if e is None else [round(e.value, 4) if e.value is not None else None,
                                   None if e.ci_low is None else round(e.ci_low, 4),
                                   None if e.ci_high is None else round(e.ci_high, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["refusal", "steer"], choices=["refusal", "steer", "steer_ab", "stage", "speed", "scan"])
    ap.add_argument("--models", nargs="+", default=["smollm2"], choices=list(MODEL_OVERRIDES))
    ap.add_argument("--per-group", type=int, default=0, help="at most this many pairs per (domain, language); 0: all")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--db", type=Path)
    ap.add_argument("--run", help="run directory for --parts stage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old-src", help="--parts speed: directory with the older safesail/ and configs/")
    ap.add_argument("--new-src", help="--parts speed: the newer tree (default: this working tree)")
    ap.add_argument("--set", nargs="*", default=[], help="--parts speed: overrides for both runs (key=value)")
    ap.add_argument("--set-new", nargs="*", default=[], help="--parts speed: overrides for the new run only "
                                                             "(keys the old version lacks)")
    ap.add_argument("--scratch", default="/tmp/bench-verify", help="--parts speed: where the run copies go")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fig = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads", "load": os.getloadavg()}
    for part in args.parts:
        fig[part] = {"refusal": refusal_part, "steer": steer_part, "steer_ab": steer_ab_part, "stage": stage_part,
                     "speed": speed_part, "scan": scan_part}[part](args)
    fig["load_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(fig, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
