"""Reading a run's files for the DB build: chosen SAEs, latent stats, segments, interpret JSONL.

Formats (written by other stages, see docs/contracts.md):
- `selection.json`: read through `safesail.train.selection.chosen_sae_dirs`
- `saes/<hook>/<folder>/cfg.json`: arch, d_in, n_latents, k, hook, model
- `latents/<hook>/stats.safetensors`, `meta.json`, `segments.jsonl`
- `interpret/{explanations,scores,tags}.jsonl`: append-only; the last record per (hook, latent) wins
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from safesail.errors import UserError
from safesail.rundir import RunDir
from safesail.jsonl import iter_jsonl
from safesail.rundir import file_sha256

log = logging.getLogger(__name__)

INTERPRET_FILES = ("explanations", "scores", "tags")


def sha256_file(path: Path) -> str | None:
    """Hex digest of a file's bytes, or None if it does not exist."""
    path = Path(path)
    return file_sha256(path) if path.is_file() else None


def record_hash(rec: dict) -> str:
    return hashlib.sha1(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()


def _resolve(rd: RunDir, p) -> Path:
    p = Path(p)
    return p if p.is_absolute() else rd.root / p


def chosen_sae_folders(cfg, rd: RunDir) -> dict[str, Path]:
    """hook -> folder of the SAE chosen for it (`safesail.train.selection.chosen_sae_dirs`);
    without a selection.json, the SAE that latents/<hook>/meta.json names."""
    out: dict[str, Path] = {}
    if rd.selection_file.is_file():
        from safesail.train.selection import chosen_sae_dirs

        return {str(h): _resolve(rd, p) for h, p in chosen_sae_dirs(cfg, rd).items()}
    for meta_path in sorted((rd.root / "latents").glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("sae"):
            out[meta["hook"]] = _resolve(rd, meta["sae"])
    return out


def read_sae_cfg(folder: Path) -> dict:
    path = Path(folder) / "cfg.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"the chosen SAE folder {folder} has no cfg.json; re-run `safesail train`.") from None
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; re-run `safesail train` for that SAE.") from None


def read_stats(path: Path) -> dict[str, np.ndarray]:
    """latent stats as float32/int64 numpy arrays."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad file
        raise UserError(f"{path} cannot be read ({e}); re-run `safesail collect`.") from None
    need = ("latent_ids", "density", "top_acts", "bottom_acts", "quantile_999", "max_act")
    missing = [k for k in need if k not in tensors]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; re-run `safesail collect`.")
    out = {}
    for k, t in tensors.items():
        out[k] = t.long().numpy() if k == "latent_ids" else t.float().numpy()
    return out


def iter_segments(path: Path) -> Iterator[dict]:
    return iter_jsonl(path)