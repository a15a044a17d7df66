"""The explain stage against a real local HTTP server that injects transport faults (issue 16 item 5).

Side by side on the same collected latents: a healthy server, and one where a share of the
answers are faulty (a 200 with a cut JSON body, empty content, an HTML page, a 500, a dropped
connection, in equal parts). Reports the latents explained after one run, the HTTP requests
and the wall time of each, so the cost of the retries is a ratio against the healthy run.

    python benchmarks/bench_explain_faults.py [--latents 32] [--fault-rate 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "interpret")]


def one_run(tmp: Path, tiny_model, n_latents: int, fault_rate: float, seed: int) -> dict:
    from llm_fault_server import FaultServer
    from test_explain import make_collected_run

    from safesail.config import compose
    from safesail.interpret.explain import run_explain_stage

    with FaultServer(reply=lambda body: "mentions of rivers and water", fault_rate=fault_rate, seed=seed) as server:
        cfg = compose(["experiment=smoke", f"run.root={tmp}", "device=cpu", "llm=openai",
                       f"llm.base_url={server.base_url}", "llm.model=fault-test-model", "llm.api_key_env=null",
                       "llm.backoff_base_s=0.05", "llm.backoff_max_s=0.5", "llm.max_retries=5",
                       "explain.language=en"])
        make_collected_run(cfg, tiny_model, n_latents=n_latents)
        t0 = time.perf_counter()
        run_explain_stage(cfg, [])
        wall = time.perf_counter() - t0
    recs = {}
    for line in (tmp / "smoke" / "interpret" / "explanations.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["latent"]] = r
    asked = [r for r in recs.values() if r["reason"] != "too_few_examples"]
    return {"ok": sum(r["status"] == "ok" for r in asked), "asked": len(asked), "requests": len(server.requests),
            "faults": sum(s != "ok" for s in server.sent), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=32)
    ap.add_argument("--fault-rate", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from safesail.config import compose
    from safesail.models import load_model

    tiny = load_model(compose(["experiment=smoke"]).model, "cpu")
    out = {}
    for name, rate in (("warm-up", 0.0), ("healthy", 0.0), ("faulty", args.fault_rate)):
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = one_run(Path(tmp), tiny, args.latents, rate, args.seed)
    out.pop("warm-up")  # imports and first-call costs
    h, f = out["healthy"], out["faulty"]
    for name, r in out.items():
        print(f"{name:8s} explained {r['ok']}/{r['asked']} in one run, {r['requests']} HTTP requests "
              f"({r['faults']} faulty), {r['wall_s']:.2f} s")
    print(f"faulty / healthy: requests {f['requests'] / h['requests']:.2f}x, wall time {f['wall_s'] / h['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
