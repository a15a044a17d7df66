"""The select stage's files, and the readers later stages call.

```
runs/<name>/selection.json                       every SAE's figures, the choice per hook, candidates
runs/<name>/selection.png                        specificity (I_CDF) against sparsity, per hook
runs/<name>/selection/<hook>.pairstats.safetensors   per-latent pair statistics of the chosen SAE
runs/<name>/selection/saes/<hook>/<sae>.json     per-SAE figures (resume cache of the stage)
runs/<name>/selection/saes/<hook>/<sae>.safetensors  per-SAE per-latent statistics (resume cache)
```

Readers for other stages: `load_selection`, `chosen_sae_dirs`, `candidate_latents`,
`load_pair_stats`. Formats are described in docs/selection.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from safesail import layout
from safesail.errors import UserError
from safesail.rundir import RunDir, atomic_write_json, hook_dirname

SELECTION_VERSION = 1


def _root(run_dir: RunDir | str | Path) -> Path:
    return Path(run_dir.root if isinstance(run_dir, RunDir) else run_dir)


def selection_path(run_dir: RunDir | str | Path) -> Path:
    return _root(run_dir) / layout.SELECTION


def plot_path(run_dir: RunDir | str | Path) -> Path:
    return _root(run_dir) / layout.SELECTION_PLOT


def pair_stats_path(run_dir: RunDir | str | Path, hook: str) -> Path:
    return _root(run_dir) / layout.SELECTION_DIR / f"{hook_dirname(hook)}.pairstats.safetensors"


def sae_result_paths(run_dir: RunDir | str | Path, hook: str, sae_name: str) -> tuple[Path, Path]:
    """(figures json, per-latent safetensors) of one SAE's evaluation, kept for resuming."""
    base = _root(run_dir) / layout.SELECTION_DIR / "saes" / hook_dirname(hook)
    return base / f"{sae_name}.json", base / f"{sae_name}.safetensors"


def write_selection(run_dir: RunDir | str | Path, selection: dict) -> Path:
    path = selection_path(run_dir)
    atomic_write_json(path, {"version": SELECTION_VERSION, **selection})
    return path


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (a killed write leaves the old file or none)."""
    from safesail.atomic import atomic_save_safetensors

    atomic_save_safetensors(path, tensors, {k: str(v) for k, v in (metadata or {}).items()})


# ---- readers for later stages ------------------------------------------------------

def load_selection(run_dir: RunDir | str | Path) -> dict:
    """The parsed selection.json; UserError if the select stage has not run."""
    path = selection_path(run_dir)
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `safesail select` (after cache and train) first.")
    try:
        sel = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; delete it and run `safesail select` again.") from None
    if sel.get("version") != SELECTION_VERSION or "chosen" not in sel:
        raise UserError(f"{path} was written by another version of Safe-SAIL; run `safesail select` again.")
    return sel


def _override(cfg: DictConfig | None) -> dict[str, str]:
    if cfg is None:
        return {}
    sel_cfg = cfg.get("select") or {}
    ov = sel_cfg.get("override") or {}
    return {str(k): str(v) for k, v in dict(ov).items()}


def chosen_sae_dirs(cfg: DictConfig | None, run_dir: RunDir | str | Path) -> dict[str, Path]:
    """`{hook: SAE folder}` of the chosen SAE per hook point, respecting `select.override`.

    Raises UserError if select has not run, or if the override in the config differs
    from the one select ran with (the candidates and pair statistics would not match).
    """
    root = _root(run_dir)
    sel = load_selection(root)
    out: dict[str, Path] = {}
    override = _override(cfg)
    for hook, choice in sel["chosen"].items():
        name = choice["sae"]
        if hook in override and override[hook] != name:
            raise UserError(f"select.override picks {override[hook]} at {hook} but selection.json holds "
                            f"{name}; run `safesail select` again to apply the override.")
        folder = root / choice["dir"]
        if not folder.is_dir():
            raise UserError(f"the chosen SAE folder {folder} is missing; run `safesail train` and "
                            "`safesail select` again.")
        out[hook] = folder
    unknown = sorted(set(override) - set(out))
    if unknown:
        raise UserError(f"select.override names the hook {unknown[0]} that select did not evaluate; use one of "
                        f"{', '.join(sorted(out)) or '(none)'}.")
    return out


def candidate_latents(run_dir: RunDir | str | Path, hook: str) -> list[int]:
    """Sorted latent ids of the chosen SAE at `hook` that distinguish some domain most strongly."""
    sel = load_selection(run_dir)
    cands = sel.get("candidate_latents", {})
    if hook not in cands:
        raise UserError(f"selection.json has no candidates for the hook {hook}; choose one of "
                        f"{', '.join(sorted(cands)) or '(none)'} or run `safesail select` for it.")
    return [int(j) for j in cands[hook]]


def load_pair_stats(run_dir: RunDir | str | Path, hook: str) -> dict[str, torch.Tensor]:
    """Per-latent tensors of the chosen SAE at `hook`: `{domain}.concept_rate`, `.neutral_rate`,
    `.mean_act_diff`, `.distinguish_rate`, `.reverse_rate`, `.freq` (domains and `all`), `latent_ids`."""
    from safetensors.torch import load_file

    path = pair_stats_path(run_dir, hook)
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `safesail select` first.")
    return load_file(str(path))


def pair_stats_metadata(run_dir: RunDir | str | Path, hook: str) -> dict[str, Any]:
    """The metadata of a pair-stats file (sae name, threshold, pairs hash, ...)."""
    from safetensors import safe_open

    path = pair_stats_path(run_dir, hook)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
