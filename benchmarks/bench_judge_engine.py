"""The verify judge's engine: does a cheaper engine judge the same way, and what does it cost?

Parts (--parts):
- ``pairs``: the hand-made answer pairs of ``bench_verify_sufficiency.py`` (six obvious, six subtle: an
  on-topic and an off-topic answer to one query): is the on-topic answer's graded p(yes) the higher one,
  for each engine (``--engines bf16 int8``; ``--set llm=...`` picks the judge model).
- ``rejudge``: a finished run's judge requests (its ``interpret/llm_cache.sqlite``, the bf16 judge's
  replies) asked again of the other engine: per request the log-odds of p(yes) beside the cached one
  (Spearman, mean absolute difference), and per latent / direction the pre-registered statistic (mean
  per-query log-odds difference, steered minus random latent and minus unsteered, seeded bootstrap
  interval: ``stats.py``) recomputed from the run's ``verify/effects.jsonl`` with the new p(yes) in place of
  the recorded ones: sign agreement, Spearman and the verdicts (interval above 0). CPU per computed judge
  token for each engine on the same first ``--timed`` requests (one engine after the other).
- ``batch``: CPU per computed judge token at engine batch sizes ``--batches`` (requests of one topic).
- ``pool``: the run's judge requests through the client with the engine's normalisers one head call per request
  vs pooled in shared head calls (session 6): CPU, and whether every p(yes) is the same to the bit.

    OMP_NUM_THREADS=1 python benchmarks/bench_judge_engine.py --parts pairs rejudge \\
        --run /tmp/final4v/runs/demo --engines bf16 int8 --out /tmp/judge_engine.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _client(args, engine: str):
    from safesail.config import compose
    from safesail.interpret.clients import make_client
    from safesail.interpret.clients.local_engine import release_engines
    from safesail.verify.judge_engine import quantize_judge

    release_engines()
    cfg = compose(list(args.set))
    client = make_client(cfg.llm, None, cache_dir=cfg.get("cache_dir"), device="cpu")
    quantize_judge(client, engine if engine != "bf16" else None)
    return client


def _p_yes(loop, client, items):
    from safesail.verify.judge import judge_many
    return judge_many(loop, client, items)


def pairs_part(args) -> dict:
    from bench_verify_sufficiency import OBVIOUS, SUBTLE

    out = {}
    for engine in args.engines:
        client, loop = _client(args, engine), asyncio.new_event_loop()
        res = {}
        for name, rows in (("obvious", OBVIOUS), ("subtle", SUBTLE)):
            p = _p_yes(loop, client, [(t, x) for t, on, off in rows for x in (on, off)])
            res[name] = {"graded_on_above_off": f"{sum((p[2 * k] or 0) > (p[2 * k + 1] or 0) for k in range(len(rows)))}"
                                                f"/{len(rows)}",
                         "yes_on_topic": f"{sum((p[2 * k] or 0) > 0.5 for k in range(len(rows)))}/{len(rows)}",
                         "p_yes": [[round(p[2 * k] or -1, 3), round(p[2 * k + 1] or -1, 3)] for k in range(len(rows))]}
        out[engine] = res
        loop.run_until_complete(client.aclose())
        loop.close()
    return out


def _cached_requests(run: Path) -> list[tuple[str, str, float]]:
    """(topic, text, cached p_yes) of every judge request in the run's response cache."""
    from safesail.verify.judge import NO, YES, _lse

    rows = sqlite3.connect(run / "interpret" / "llm_cache.sqlite").execute(
        "select request, response from responses where request like '%Is the%text about the topic%'").fetchall()
    out = []
    for req, resp in rows:
        prompt = json.loads(req)["params"]["prompt"]
        topic = prompt.split("Topic: ", 1)[1].split("\n", 1)[0]
        text = prompt.split("\nText: ", 1)[1].rsplit("<|im_end|>", 1)[0]
        lp = (json.loads(resp).get("next_logprobs") or [{}])[-1]
        a, b = _lse(lp, YES), _lse(lp, NO)
        if math.isfinite(a) and math.isfinite(b):
            out.append((topic, text, 1 / (1 + math.exp(-max(-50.0, min(50.0, a - b))))))
    return out


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for k, i in enumerate(order):
            r[i] = k
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def _boot(values: list[float], n_boot: int = 200, seed: int = 0) -> tuple[float, float, float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(n_boot))
    return sum(values) / len(values), means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def rejudge_part(args) -> dict:
    from safesail.verify.stats import logodds_diffs

    run = Path(args.run)
    cached = _cached_requests(run)
    by_value = {(t, round(p, 6)): x for t, x, p in cached}
    recs = [json.loads(line) for line in (run / "verify" / "effects.jsonl").read_text().splitlines() if line.strip()]
    items = list(dict.fromkeys((t, x) for t, x, _ in cached))
    out = {"requests": len(items)}
    new: dict[str, dict] = {}
    for engine in args.engines:
        client, loop = _client(args, engine), asyncio.new_event_loop()
        eng = getattr(getattr(client, "inner", client), "engine", None)
        todo = items if engine != "bf16" else items[:args.timed]
        timed = {}
        c0, t0, k0 = time.process_time(), time.perf_counter(), eng.stats.computed_tokens
        first = _p_yes(loop, client, todo[:args.timed])
        timed = {"requests": len(todo[:args.timed]), "cpu_s": round(time.process_time() - c0, 1),
                 "wall_s": round(time.perf_counter() - t0, 1), "computed_tokens": eng.stats.computed_tokens - k0}
        timed["cpu_ms_per_token"] = round(1000 * timed["cpu_s"] / max(1, timed["computed_tokens"]), 2)
        rest = _p_yes(loop, client, todo[args.timed:]) if len(todo) > args.timed else []
        new[engine] = dict(zip(todo, first + rest))
        out[f"timed_{engine}"] = timed
        loop.run_until_complete(client.aclose())
        loop.close()
    cached_p = {(t, x): p for t, x, p in cached}

    def lo(p):
        p = min(max(p, 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))

    for engine, got in new.items():
        keys = [k for k in got if got[k] is not None and k in cached_p]
        a, b = [lo(cached_p[k]) for k in keys], [lo(got[k]) for k in keys]
        out[f"requests_{engine}"] = {"n": len(keys), "spearman_logodds": round(_spearman(a, b), 4),
                                     "mean_abs_logodds_diff": round(sum(abs(x - y) for x, y in zip(a, b)) / len(a), 4)}
    engine = [e for e in args.engines if e != "bf16"][-1] if any(e != "bf16" for e in args.engines) else None
    if engine is None:
        return out
    got = new[engine]

    def mapped(topic, ps):
        res = []
        for p in ps or []:
            x = by_value.get((topic, round(p, 6))) if p is not None else None
            res.append(got.get((topic, x)) if x is not None else None)
        return res

    rows = []
    suff = {}
    for r in recs:
        if r["check"] == "sufficiency" and r["metric"] == "on_concept_rate":
            suff.setdefault((r["hook"], r["latent"] if r["target"] != "random_latent" else None, r["domain"],
                             r["target"]), []).append(r)
    randoms = {}
    for r in recs:
        if r["check"] == "sufficiency" and r["metric"] == "on_concept_rate" and r["target"] == "random_latent":
            randoms[(r["hook"], r["domain"], r["details"].get("topic"))] = r
    for r in recs:
        if not (r["check"] == "sufficiency" and r["metric"] == "on_concept_rate" and r["target"] != "random_latent"):
            continue
        d = r["details"]
        topic = d.get("topic")
        st_old, un_old = d.get("p_yes"), d.get("unsteered_p_yes")
        st_new, un_new = mapped(topic, st_old), mapped(topic, un_old)
        row = {"unit": f"{r['hook']}:{r['latent'] if r['latent'] is not None else r['domain']}"}
        for tag, old_b, new_b in (("unsteered", un_old, un_new),):
            o, n = logodds_diffs(st_old, old_b), logodds_diffs(st_new, new_b)
            row[f"vs_{tag}"] = {"old": [round(x, 3) for x in _boot(o)], "new": [round(x, 3) for x in _boot(n)] if n else None}
        rr = randoms.get((r["hook"], r["domain"], topic)) if r["target"] == "latent" else None
        if rr is not None:
            ro, rn = rr["details"].get("p_yes"), mapped(topic, rr["details"].get("p_yes"))
            o, n = logodds_diffs(st_old, ro), logodds_diffs(st_new, rn)
            row["vs_random"] = {"old": [round(x, 3) for x in _boot(o)], "new": [round(x, 3) for x in _boot(n)] if n else None}
        row["unmatched"] = sum(x is None for x in st_new + un_new)
        rows.append(row)
    summary = {}
    for tag in ("vs_random", "vs_unsteered"):
        pairs = [(r[tag]["old"], r[tag]["new"]) for r in rows if tag in r and r[tag]["new"]]
        if not pairs:
            continue
        summary[tag] = {"units": len(pairs),
                        "sign_agreement": f"{sum((o[0] > 0) == (n[0] > 0) for o, n in pairs)}/{len(pairs)}",
                        "spearman": round(_spearman([o[0] for o, _ in pairs], [n[0] for _, n in pairs]), 3),
                        "verdicts_old": sum(o[1] > 0 for o, _ in pairs), "verdicts_new": sum(n[1] > 0 for _, n in pairs),
                        "verdict_agreement": f"{sum((o[1] > 0) == (n[1] > 0) for o, n in pairs)}/{len(pairs)}"}
    out["units"] = rows
    out["summary"] = summary
    return out


def batch_part(args) -> dict:
    """CPU per computed judge token at several engine batch sizes, on `--timed` requests of the run's most
    judged topic (prefix of system prompt, topic and question computed once first), in rounds."""
    run = Path(args.run)
    by_topic: dict[str, list[str]] = {}
    for t, x, _ in _cached_requests(run):
        by_topic.setdefault(t, []).append(x)
    topic, texts = max(by_topic.items(), key=lambda kv: len(kv[1]))
    client = _client(args, args.engines[-1])
    local = getattr(client, "inner", client)
    eng, tok = local.engine, local.tokenizer
    from safesail.verify.judge import judge_messages
    ids = [tok(local.chat_prompt(judge_messages(topic, x)), add_special_tokens=False)["input_ids"]
           for x in texts[:args.timed]]
    cand = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no")]
    rows = []
    for rnd in range(2):
        for b in args.batches:
            eng.cache.clear()
            eng.logprobs([ids[0][:-8]], cand, [None])
            k0, c0 = eng.stats.computed_tokens, time.process_time()
            for k in range(0, len(ids), b):
                part = ids[k:k + b]
                eng.logprobs(part, cand, [[False] * (len(x) - 1) + [True] for x in part])
            n, cpu = eng.stats.computed_tokens - k0, time.process_time() - c0
            rows.append({"round": rnd, "batch": b, "requests": len(ids), "computed_tokens": n, "cpu_s": round(cpu, 2),
                         "cpu_ms_per_token": round(1000 * cpu / max(1, n), 2)})
            print(json.dumps(rows[-1]), flush=True)
    return {"topic": topic, "engine": args.engines[-1], "rows": rows}


def pool_part(args) -> dict:
    """The run's first `--timed` judge requests (topic by topic, as a wave asks them) through the judge client
    at engine batch `--batches[0]` (the demo's `verify.judge_batch_size` 16), the engine's softmax normalisers
    one head call per request (`pool_normalisers` off, before session 6) and pooled in shared calls (on),
    alternated over `--rounds`: CPU per request and whether every p(yes) is the same to the bit."""
    from safesail.verify.judge import judge_many

    reqs = sorted(_cached_requests(Path(args.run)), key=lambda r: r[0])[:args.timed]
    items = [(t, x) for t, x, _ in reqs]
    client = _client(args, "bf16")
    local = getattr(client, "inner", client)
    local.batch_size = args.batches[0]
    eng = local.engine
    loop = asyncio.new_event_loop()
    rows, got = [], {}
    for rnd in range(args.rounds):
        for pool in ((False, True) if rnd % 2 == 0 else (True, False)):
            eng.cache.clear()
            eng.pool_normalisers = pool
            k0, c0 = eng.stats.computed_tokens, time.process_time()
            p = judge_many(loop, client, items)
            cpu = time.process_time() - c0
            got.setdefault(pool, p)
            rows.append({"round": rnd, "pooled": pool, "requests": len(items), "cpu_s": round(cpu, 2),
                         "cpu_ms_per_request": round(1000 * cpu / len(items), 1),
                         "computed_tokens": eng.stats.computed_tokens - k0, "load": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    loop.run_until_complete(client.aclose())
    loop.close()
    same = sum(a == b for a, b in zip(got[False], got[True]))
    cached = max(abs(a - c) for a, (_, _, c) in zip(got[True], reqs))
    out = {"batch": args.batches[0], "rows": rows, "identical_p_yes": f"{same}/{len(items)}",
           "max_abs_diff_vs_cached_p_yes": cached, "pool_exact_probe": eng._pool_exact}
    for pool in (False, True):
        cpu = [r["cpu_s"] for r in rows if r["pooled"] == pool]
        out[f"cpu_s_{'pooled' if pool else 'per_request'}"] = cpu
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["pairs"], choices=["pairs", "rejudge", "batch", "pool"])
    ap.add_argument("--batches", nargs="+", type=int, default=[4, 16, 32], help="--parts batch: engine batch sizes")
    ap.add_argument("--engines", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    ap.add_argument("--run", help="a finished run directory (verify/ and its llm_cache.sqlite) for --parts rejudge")
    ap.add_argument("--timed", type=int, default=96, help="requests timed for each engine")
    ap.add_argument("--set", nargs="*", default=["llm=qwen-coder-1.5b", "llm.threads=1"])
    ap.add_argument("--rounds", type=int, default=2, help="--parts pool: alternated rounds")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    fig = {"machine": f"{os.cpu_count()} CPUs", "load": os.getloadavg()}
    for part in args.parts:
        fig[part] = {"pairs": pairs_part, "rejudge": rejudge_part, "batch": batch_part, "pool": pool_part}[part](args)
    fig["load_after"] = os.getloadavg()
    print(json.dumps({k: v for k, v in fig.items() if k != "rejudge"} | (
        {"rejudge": {k: v for k, v in fig["rejudge"].items() if k != "units"}} if "rejudge" in fig else {}),
        indent=1, ensure_ascii=False))
    if args.out:
        args.out.write_text(json.dumps(fig, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
