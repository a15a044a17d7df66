"""The sweep: which SAEs `safesail train` trains (configs/sae/*.yaml), and the sweep table.

A sweep config lists entries; a list-valued key expands into a grid (a list-valued setting
such as matryoshka's `prefixes` grids only when given as a list of lists):
```yaml
saes:
  - {arch: topk, k: [16, 32, 64]}      # three SAEs
  - {arch: batchtopk, k: 32}
```
`sae.k` (a number or list) replaces every k-architecture's k and `sae.arch` keeps only the
named architectures, so Hydra multirun can split a sweep into jobs:
`safesail train -m sae.k=16,32,64`. Every entry is trained on every hook of `sae.hooks`
(default: each layer of `model.layers` at `model.hook_site`).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from safesail import layout
from safesail.errors import UserError
from safesail.rundir import atomic_write_json
from safesail.saes import SAEConfig, k_archs, list_saes, read_cfg, read_metrics

TABLE_COLUMNS = ("hook", "name", "arch", "k", "n_latents", "l0", "fvu", "dead_fraction", "ce_loss_recovered",
                 "kl_to_clean", "tokens_trained")


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def sweep_entries(sae_cfg: DictConfig | dict) -> list[dict]:
    """The sweep's SAE entries (dicts), grids expanded, `k` override and `arch` filter applied."""
    sc = _plain(sae_cfg) or {}
    entries = sc.get("saes") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError("sae.saes must be a list of entries like {arch: topk, k: 32}; see configs/sae/topk-sweep.yaml.")
    k_over = sc.get("k")
    arch_keep = sc.get("arch")
    if isinstance(arch_keep, str):
        arch_keep = [arch_keep]
    out: list[dict] = []
    for e in entries:
        e = dict(e)
        if arch_keep and e.get("arch", "topk") not in arch_keep:
            continue
        if k_over is not None and e.get("arch", "topk") in k_archs():
            e["k"] = k_over
        seq = SAEConfig.sequence_keys(e.get("arch", "topk"))
        keys = [k for k, v in e.items() if isinstance(v, list) and (k not in seq or all(isinstance(x, list) for x in v))]
        for combo in itertools.product(*(e[k] for k in keys)):
            out.append({**e, **dict(zip(keys, combo))})
    if not out:
        raise UserError("the SAE sweep is empty (check sae.saes and the sae.arch filter); list at least one SAE.")
    return out


def sweep_hooks(cfg: DictConfig) -> list[str]:
    from safesail.hooks import configured_hooks

    return [hp.name for hp in configured_hooks(cfg)]


# train.* keys that are per-SAE defaults (an entry of the sweep may override each)
TRAIN_DEFAULTS = ("lr", "optimizer", "seed", "enc_init", "enc_init_scale", "auxk_alpha", "k_aux", "b_dec_init",
                  "dec_init", "normalize")


def entry_config(entry: dict, defaults: dict) -> SAEConfig:
    """One SAEConfig from `{**defaults, **entry}`, validated; an unknown entry key is one sentence."""
    arch = entry.get("arch", "topk")
    allowed = SAEConfig.entry_keys(arch)  # UserError for an unknown architecture
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise UserError(f"the sweep entry {entry} has an unknown key {unknown[0]!r} for architecture {arch}; "
                        f"allowed keys: {', '.join(allowed)}.")
    return SAEConfig(**{**defaults, **entry, "arch": arch}).validate()


def make_configs(entries: list[dict], hook: str, d_in: int, model: str, cfg: DictConfig) -> list[SAEConfig]:
    """SAEConfigs for one hook: width from sae.n_latents or sae.expansion * d_in; training defaults from train.*."""
    sc, tc = cfg.sae, cfg.train
    expected = sc.get("d_in")
    if expected and int(expected) != d_in:
        raise UserError(f"the activation cache of {hook} is {d_in} wide but sae.d_in={expected}; cache the "
                        "configured model again or fix sae.d_in.")
    n = sc.get("n_latents") or int(round(float(sc.get("expansion", 10)) * d_in))
    defaults = {k: _plain(tc.get(k)) for k in TRAIN_DEFAULTS if tc.get(k) is not None}
    defaults.update(d_in=d_in, hook=hook, model=model, n_latents=int(n))
    return [entry_config(e, defaults) for e in entries]


def sweep_rows(saes_root: Path) -> list[dict]:
    rows = []
    for folder in list_saes(saes_root):
        c = read_cfg(folder)
        m = read_metrics(folder) or {}
        row = {"hook": c.hook, "name": folder.name, "arch": c.arch, "k": c.k, "n_latents": c.n_latents,
               "folder": str(folder.relative_to(saes_root))}
        row.update({k: m.get(k) for k in TABLE_COLUMNS if k in m})
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return "-" if v is None else str(v)

    table = [list(TABLE_COLUMNS)] + [[cell(r.get(c)) for c in TABLE_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table)


def write_sweep(saes_root: Path, plot: bool = True) -> tuple[list[dict], Path, Path | None]:
    """Write saes/sweep.json (+ saes/sweep.png) from every SAE folder under `saes_root`."""
    from safesail.train.plots import plot_sweep

    rows = sweep_rows(saes_root)
    path = saes_root / layout.SWEEP_SUMMARY
    atomic_write_json(path, {"columns": list(TABLE_COLUMNS), "saes": rows})
    png = plot_sweep(rows, saes_root / "sweep.png") if plot else None
    return rows, path, png


def load_sweep(saes_root: Path) -> list[dict]:
    path = Path(saes_root) / layout.SWEEP_SUMMARY
    return json.loads(path.read_text())["saes"] if path.is_file() else []
