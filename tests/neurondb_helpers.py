"""Hand-made run directories for the neuron-DB tests, in the formats other stages write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

DOMAINS = ("politics", "pornography", "violence", "terror")


def write_sae(run_dir: Path, hook: str, folder: str, n_latents: int, d_in: int = 16, k: int = 4, seed: int = 0) -> str:
    rel = f"saes/{hook}/{folder}"
    d = run_dir / rel
    d.mkdir(parents=True, exist_ok=True)
    (d / "cfg.json").write_text(json.dumps({"arch": "topk", "d_in": d_in, "n_latents": n_latents, "k": k,
                                            "hook": hook, "model": "tiny"}))
    g = torch.Generator().manual_seed(seed)
    save_file({"W_enc": torch.randn(n_latents, d_in, generator=g)}, str(d / "sae.safetensors"))
    return rel


def write_latents(run_dir: Path, hook: str, sae_rel: str, latent_ids, k: int = 8, bins: int = 6, seed: int = 0,
                  segs_per_latent: int = 3, model: str = "tiny") -> dict:
    d = run_dir / "latents" / hook
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    m = len(latent_ids)
    top = -np.sort(-rng.gamma(2.0, 1.0, size=(m, k)), axis=1).astype(np.float32)
    bottom = np.sort(rng.uniform(0, 0.01, size=(m, k)), axis=1).astype(np.float32)
    stats = {"latent_ids": torch.tensor(latent_ids, dtype=torch.int64),
             "density": torch.tensor(rng.uniform(0, 0.1, m), dtype=torch.float32),
             "top_acts": torch.from_numpy(top), "bottom_acts": torch.from_numpy(bottom),
             "quantile_999": torch.from_numpy(top[:, k // 2].copy()),
             "max_act": torch.from_numpy(top[:, 0].copy()),
             "hist_counts": torch.from_numpy(rng.integers(0, 100, (m, bins)).astype(np.float32)),
             "hist_edges": torch.from_numpy(np.tile(np.linspace(0, 5, bins + 1, dtype=np.float32), (m, 1)))}
    save_file(stats, str(d / "stats.safetensors"))
    layer = int(hook.split(".")[1])
    (d / "meta.json").write_text(json.dumps({"hook": hook, "layer": layer, "sae": sae_rel, "model": model,
                                             "num_tokens": 8192}))
    with open(d / "segments.jsonl", "w") as f:
        for lat in latent_ids:
            for j in range(segs_per_latent):
                toks = [f"t{lat}", "_a", "_b", f"_{j}"]
                f.write(json.dumps({"hook": hook, "latent": int(lat), "segment_id": f"{lat}-{j}", "split": "explain",
                                    "kind": "top" if j < 2 else "random", "level": j, "doc_id": j, "start": 4 * j,
                                    "token_ids": [lat % 100, 1, 2, j], "tokens": toks,
                                    "acts": [float(x) for x in rng.uniform(0, 2, 4).round(3)]}) + "\n")
    return stats


def append_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def interpret_records(hook: str, latent_ids, version: str = "v1"):
    layer = int(hook.split(".")[1])
    expl, scores, tags = [], [], []
    for i, lat in enumerate(latent_ids):
        dom = DOMAINS[i % 4] if i % 3 else None
        text = f"{dom or 'punctuation'} related words, latent {lat} ({version})"
        expl.append({"hook": hook, "layer": layer, "latent": int(lat), "status": "ok", "explanation": text,
                     "error": None, "model": "smollm2", "prompt_version": "explain-v1", "raw": text,
                     "prompt_tokens": 123, "time": "2026-01-01T00:00:00"})
        scores.append({"hook": hook, "layer": layer, "latent": int(lat), "status": "ok",
                       "score": round(0.1 + 0.8 * i / max(1, len(latent_ids) - 1), 4), "failure": None,
                       "kind": "correlation", "mode": "segment", "granularity": "segment", "simulator": "smollm2",
                       "prompt_version": "sim-v1", "n_tokens": 40, "llm_calls": 4, "prompt_tokens": 900,
                       "seconds": 1.5, "segments": [{"id": "a", "sim": [0, 1], "true": [0, 2]}],
                       "time": "2026-01-01T00:00:01"})
        tags.append({"hook": hook, "layer": layer, "latent": int(lat), "tags": [dom] if dom else [],
                     "evidence": {dom: {"share": 0.7}} if dom else {}, "thresholds": {"share": 0.5},
                     "time": "2026-01-01T00:00:02"})
    return expl, scores, tags


def make_run(run_dir: Path, hooks=("layers.1.mlp_out", "layers.3.mlp_out"), n_latents: int = 64, m: int = 12,
             k: int = 8, model: str = "tiny") -> dict:
    """A run directory with chosen SAEs, collected latents and interpret outputs for every hook."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(f"model:\n  name: {model}\n")
    sel = {"version": 1, "chosen": {}}
    out = {}
    for h, hook in enumerate(hooks):
        rel = write_sae(run_dir, hook, "topk-k4", n_latents, seed=h)
        sel["chosen"][hook] = {"sae": "topk-k4", "dir": rel}
        ids = list(range(3, 3 + 5 * m, 5))
        out[hook] = {"ids": ids, "stats": write_latents(run_dir, hook, rel, ids, k=k, seed=h, model=model)}
        expl, scores, tags = interpret_records(hook, ids)
        append_jsonl(run_dir / "interpret" / "explanations.jsonl", expl)
        append_jsonl(run_dir / "interpret" / "scores.jsonl", scores)
        append_jsonl(run_dir / "interpret" / "tags.jsonl", tags)
    (run_dir / "selection.json").write_text(json.dumps(sel))
    return out
