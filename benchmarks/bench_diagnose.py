"""Diagnose stage latency and throughput on the embedded default (SmolLM2-135M-Instruct) on CPU.

Measures, side by side in one process:
  * baseline: the model alone generating the same answer (`model.generate`, greedy, same token limit);
  * diagnose end to end (`DiagnoseEngine.diagnose`): generate + one forward pass over query+answer
    + SAE encoding of 5 layers + neuron-DB lookup + building the per-token tables;
  * the SAE encoding + DB lookup share against the model's own forward + generation time;
  * throughput of the HTTP API with N concurrent clients (uvicorn, one model behind the queue).

If no neuron DB is given it builds one of the default run's real shape through the public
functions: five random TopK SAEs (576 in, 5,760 latents, k=32) saved in Safe-SAIL's checkpoint
layout, top-activation tables measured on the bundled corpus, an en_db.json naming every latent
that fired, and `safesail.neurondb.import_safesail` to import it.

    python benchmarks/bench_diagnose.py --runs 12 --new-tokens 64 --clients 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
QUERY = "Write a short story about a cat who learns to fly."
DOMAINS = ["politics", "pornography", "violence", "terror"]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def calibration_ids(tok, n_docs: int, max_len: int) -> list[list[int]]:
    out = []
    for name in ("text_en.jsonl", "text_zh.jsonl", "text_hi.jsonl", "queries.jsonl"):
        path = REPO / "data" / "corpus" / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines()[:n_docs]:
            rec = json.loads(line)
            text = rec.get("text") or " ".join(m.get("content", "") for m in rec.get("messages", []))
            if text:
                out.append(tok(text, add_special_tokens=False)["input_ids"][:max_len])
    return out


def build_random_db(lm, layers, folder: Path, n_latents: int, k: int, table_k: int = 100) -> Path:
    from safesail.hooks import HookPoint, capture_activations
    from safesail.neurondb import import_safesail as imp
    from safesail.saes import SAEConfig, build_sae
    from safesail.saes.safesail_layout import save_safesail_checkpoint

    db_path = folder / "neurons.sqlite"
    if db_path.exists():
        return db_path
    rel = folder / "release"
    rel.mkdir(parents=True, exist_ok=True)
    seqs = calibration_ids(lm.tokenizer, 12, 256)
    points = [HookPoint(L) for L in layers]
    acts = {p.name: [] for p in points}
    for s in seqs:
        got = capture_activations(lm.model, torch.tensor([s]), None, points)
        for p in points:
            acts[p.name].append(got[p.name][0].float())
    n_tokens = sum(len(s) for s in seqs)
    entries = {}
    g = torch.Generator().manual_seed(0)
    for L in layers:
        torch.manual_seed(L)
        sae = build_sae(SAEConfig(arch="topk", d_in=lm.hidden_size, n_latents=n_latents, k=k,
                                  hook=f"layers.{L}.mlp_out", model=lm.name, normalize=False, b_dec_init="zeros"))
        save_safesail_checkpoint(sae, rel / f"ckpt_layer{L}.pt")
        with torch.no_grad():
            codes = sae.encode(torch.cat(acts[f"layers.{L}.mlp_out"]))
        fired = (codes > 0).any(0).nonzero().flatten()
        top = codes[:, fired].topk(min(table_k, codes.shape[0]), dim=0).values
        torch.save(fired.clone(), rel / f"indices_layer{L}.pt")
        torch.save({"top_neuron_activations": top, "bottom_neuron_activations": torch.zeros_like(top)},
                   rel / f"quantile_layer{L}.pt")
        for i in fired.tolist():
            r = int(torch.randint(0, 6, (1,), generator=g))
            entries[f"{L}_{i}"] = {"explanation": f"random latent {L}_{i}: a placeholder explanation of typical length "
                                                  "that names a concept and the contexts it fires in",
                                   "correlation_score": round(0.2 + 0.5 * float(torch.rand(1, generator=g)), 3),
                                   "tag_list": [DOMAINS[r]] if r < 4 else []}
        print(f"layer {L}: {len(fired)} of {n_latents} latents fired on {n_tokens} calibration tokens")
    (rel / "en_db.json").write_text(json.dumps(entries), encoding="utf-8")
    found = imp.find_release_files(rel)
    release = imp.read_release(found["en_db"], found["indices"], found["quantile"], found["ckpt"])
    imp.import_release(db_path, release, model=lm.name, num_tokens=n_tokens, sae_k=k)
    return db_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, help="an existing neuron DB for the default model (else a random one is built)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-diagnose")
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=3)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared 2-core machine, 2 threads ran 6x slower under load)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()

    import httpx

    from diagnose_helpers import LiveServer, make_engine
    from safesail.config import compose
    from safesail.diagnose.api.common import ServerSettings
    from safesail.diagnose.server import create_app
    from safesail.diagnose.tokens import encode_prompt
    from safesail.models import load_model

    cfg = compose([])
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(cfg.model, "cpu")
    print(f"model {lm.name} loaded in {time.perf_counter() - t0:.1f}s; torch threads {torch.get_num_threads()}")
    built = args.db is None
    db_path = args.db or build_random_db(lm, list(cfg.model.layers), args.work, 10 * lm.hidden_size, args.k)
    engine = make_engine(lm, db_path, max_new_tokens=args.new_tokens, max_new_tokens_limit=max(256, args.new_tokens),
                         top=30, system_prompt=cfg.model.system_prompt, threads=args.threads)
    print(f"DB {db_path}: " + ", ".join(f"{b.hook}: {len(b.latent_ids)}" for b in engine.saes))

    prompt_ids, _ = encode_prompt(lm.tokenizer, QUERY, cfg.model.system_prompt)
    cold = engine.diagnose(QUERY)  # warm-up; the first lookups are uncached
    base, diag = [], []
    for i in range(args.runs):
        t = time.perf_counter()
        ans, _ = engine.generate(prompt_ids, args.new_tokens, 0.0)
        with torch.no_grad():  # the baseline also runs the one forward pass any per-token view needs
            lm.model(torch.tensor([prompt_ids + ans]))
        base.append(time.perf_counter() - t)
        r = engine.diagnose(QUERY)
        diag.append(r.timings)
    n_answer = len(ans)
    model_s = [t.generate_s + t.forward_s for t in diag]
    over = [(t.encode_s + t.lookup_s) / (t.generate_s + t.forward_s) for t in diag]
    resp_share = [t.respond_s / (t.generate_s + t.forward_s) for t in diag]
    total = [t.total_s for t in diag]

    app = create_app(engine, ServerSettings(queue_size=max(8, args.clients * 2), request_timeout_s=600))
    with LiveServer(app) as srv:
        def client(n, out):
            for _ in range(n):
                t = time.perf_counter()
                r = httpx.post(srv.url + "/api/diagnose", json={"query": QUERY}, timeout=600)
                r.raise_for_status()
                out.append(time.perf_counter() - t)

        one: list[float] = []
        t = time.perf_counter()
        client(args.per_client, one)
        seq_rps = args.per_client / (time.perf_counter() - t)
        lat: list[float] = []
        threads = [threading.Thread(target=client, args=(args.per_client, lat)) for _ in range(args.clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        conc_rps = args.clients * args.per_client / (time.perf_counter() - t)

    fig = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "db": "random SAEs + imported DB (built here)" if built else str(db_path),
        "query": QUERY, "answer_tokens": n_answer, "runs": args.runs,
        "baseline_model_p50_s": statistics.median(base), "baseline_model_p95_s": pct(base, 0.95),
        "diagnose_p50_s": statistics.median(total), "diagnose_p95_s": pct(total, 0.95),
        "ratio_p50_diagnose_over_baseline": statistics.median(total) / statistics.median(base),
        "model_p50_s": statistics.median(model_s),
        "generate_p50_s": statistics.median(t.generate_s for t in diag),
        "forward_p50_s": statistics.median(t.forward_s for t in diag),
        "encode_p50_ms": 1000 * statistics.median(t.encode_s for t in diag),
        "lookup_p50_ms": 1000 * statistics.median(t.lookup_s for t in diag),
        "lookup_cold_ms": 1000 * cold.timings.lookup_s,
        "respond_p50_ms": 1000 * statistics.median(t.respond_s for t in diag),
        "sae_db_overhead_p50": statistics.median(over), "sae_db_overhead_max": max(over),
        "respond_share_p50": statistics.median(resp_share),
        "http_1_client_rps": seq_rps, "http_1_client_latency_p50_s": statistics.median(one),
        f"http_{args.clients}_clients_rps": conc_rps,
        f"http_{args.clients}_clients_latency_p50_s": statistics.median(lat),
        f"http_{args.clients}_clients_latency_p95_s": pct(lat, 0.95),
    }
    for k, v in fig.items():
        print(f"{k:>34}: {v:.4f}" if isinstance(v, float) else f"{k:>34}: {v}")
    if args.out:
        args.out.write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
