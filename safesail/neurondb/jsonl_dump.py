"""A plain JSONL dump of the whole neuron DB: one line per latent, everything `NeuronDB.latent` returns."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from safesail.atomic import atomic_path
from safesail.neurondb.store import NeuronDB


def dump_jsonl(db: NeuronDB, path: Path) -> int:
    """Write every latent to `path` (atomically); returns the number of lines."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        info = db.model_info()
        for rec in tqdm(db.iter_latents(), desc="jsonl dump", unit="latent"):
            f.write(json.dumps({"model": info["model"], **rec}, ensure_ascii=False) + "\n")
            n += 1
    return n
