"""A plain JSONL dump of the whole neuron DB: one line per latent, everything `NeuronDB.latent` returns."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from safesail.neurondb.store import NeuronDB


def dump_jsonl(db: NeuronDB, path: Path) -> int:
    """Write every latent to `path` (atomically); returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        info = db.model_info()
        for rec in tqdm(db.iter_latents(), desc="jsonl dump", unit="latent"):
            f.write(json.dumps({"model": info["model"], **rec}, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n
