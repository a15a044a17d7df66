"""bf16 vs float32 on this machine's CPU, for each place the configs choose a dtype (`${if_bf16_fast:A,B}`).

    python benchmarks/bench_bf16_kernels.py                  # all four parts, 3 alternating rounds
    python benchmarks/bench_bf16_kernels.py --parts linear sae --rounds 5 --threads 1

Each part runs the same work in float32 and in bf16, alternating (float32, bf16, float32, ...) so that load
from other jobs hits both alike, and prints the median seconds of each and the ratio bf16 / float32
(above 1: bf16 is slower here). The parts:

- `linear`: one 2048 x 1536 x 8960 product (an MLP-sized layer of Qwen2.5-Coder-1.5B);
- `sae`: one TopK SAE training step (forward_with_loss + backward), d 576, 5,760 latents, k 128, batch 1024,
  float32 weights, with and without bf16 autocast (the demo's `train.autocast`);
- `source`: SmolLM2-135M-Instruct's forward on 8 windows of 128 tokens (the demo's `model.dtype`);
- `judge`: Qwen2.5-Coder-1.5B-Instruct's prefill of 4 rows of 48 tokens (the demo's `llm.model.dtype`;
  its converted folder must be in the cache: `python -m safesail.models.qwen_coder 1.5b`).

It also prints what `safesail.cpu_kernels.bf16_is_fast()` says, i.e. what the configs pick here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _linear(dtype: torch.dtype):
    a = torch.randn(2048, 1536).to(dtype)
    w = torch.randn(8960, 1536).to(dtype)
    torch.nn.functional.linear(a[:64], w)
    return lambda: torch.nn.functional.linear(a, w)


def _sae(dtype: torch.dtype):
    import contextlib

    from safesail.saes.registry import build_sae

    torch.manual_seed(0)
    sae = build_sae({"arch": "topk", "d_in": 576, "n_latents": 5760, "k": 128})
    x = torch.randn(1024, 576)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == torch.bfloat16 else contextlib.nullcontext

    def step():
        sae.zero_grad(set_to_none=True)
        with ctx():
            out = sae.forward_with_loss(x)
        out.loss.backward()
    step()
    return step


def _model(folder: Path, rows: int, tokens: int):
    def make(dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        ids = torch.randint(100, 20000, (rows, tokens))

        def fwd():
            with torch.no_grad():
                m(ids)
        with torch.no_grad():
            m(ids[:1, :8])
        return fwd
    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["linear", "sae", "source", "judge"],
                    choices=["linear", "sae", "source", "judge"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from safesail.cpu_kernels import bf16_is_fast

    cache = Path(os.environ.get("SAFESAIL_CACHE", Path.home() / ".cache" / "safesail")) / "models"
    folders = {"source": cache / "smollm2-135m-instruct", "judge": cache / "qwen2.5-coder-1.5b-instruct"}
    makers = {"linear": _linear, "sae": _sae, "source": _model(folders["source"], 8, 128),
              "judge": _model(folders["judge"], 4, 48)}
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "bf16_is_fast": bf16_is_fast(), "parts": {}}
    print(f"bf16_is_fast() = {report['bf16_is_fast']}   torch threads {report['threads']}")
    for part in a.parts:
        if part in folders and not folders[part].is_dir():
            print(f"{part}: no converted model folder {folders[part]}; skipped")
            continue
        fns = {dt: makers[part](dt) for dt in (torch.float32, torch.bfloat16)}
        times = {dt: [] for dt in fns}
        for _ in range(a.rounds):
            for dt, fn in fns.items():
                times[dt].append(_timed(fn))
        f32, b16 = statistics.median(times[torch.float32]), statistics.median(times[torch.bfloat16])
        report["parts"][part] = {"float32_s": f32, "bf16_s": b16, "bf16_over_float32": b16 / f32}
        print(f"{part:7s} float32 {f32:8.3f} s   bf16 {b16:8.3f} s   bf16 / float32 {b16 / f32:5.2f}", flush=True)
        del fns
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
