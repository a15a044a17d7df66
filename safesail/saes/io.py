"""Save and load SAE folders: `cfg.json` + `sae.safetensors` (+ `metrics.json`). See docs/sae-format.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from safesail.errors import UserError
from safesail.atomic import atomic_save_safetensors, atomic_write_json
from safesail.saes.base import SAE
from safesail.saes.config import SAEConfig
from safesail.saes.registry import build_sae

FORMAT = "safesail-sae/1"


def save_sae(sae: SAE, folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write `sae` (already folded to raw activation units) into `folder`; atomic per file.

    The weights go first and cfg.json last, so a folder with cfg.json is always complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()}
    atomic_save_safetensors(folder / "sae.safetensors", tensors, metadata={"format": FORMAT, "arch": sae.cfg.arch})
    if metrics is not None:
        atomic_write_json(folder / "metrics.json", metrics)
    atomic_write_json(folder / "cfg.json", {"format": FORMAT, **sae.cfg.to_dict()})
    return folder


def read_cfg(folder: str | Path) -> SAEConfig:
    path = Path(folder) / "cfg.json"
    try:
        return SAEConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise UserError(f"{folder} holds no SAE (no cfg.json); train one with `safesail train` "
                        "or point at a folder from `list_saes`.") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path} is not a valid SAE config ({e}); re-train or re-export that SAE.") from None


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder into its architecture's module (eval mode); needs no trainer."""
    folder = Path(folder)
    cfg = read_cfg(folder)
    weights = folder / "sae.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder} has cfg.json but no sae.safetensors; re-run `safesail train` to finish it.")
    sae = build_sae(cfg, device="cpu")
    state = load_file(str(weights))
    missing = set(sae.state_dict()) - set(state)
    if missing:
        raise UserError(f"{weights} lacks {sorted(missing)} for a {cfg.arch} SAE; the file is damaged or "
                        "from another tool.")
    sae.load_state_dict(state)
    return sae.to(device).eval()


def read_metrics(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def list_saes(root: str | Path) -> list[Path]:
    """Every SAE folder (holding cfg.json and sae.safetensors) under `root`, sorted."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p.parent for p in root.rglob("cfg.json")
                  if (p.parent / "sae.safetensors").is_file() and not any(part.startswith(".") for part in
                                                                          p.relative_to(root).parts))
