"""`safesail db export`: write Safe-SAIL's release layout (and a JSONL dump) from a neuron DB.

Into `<out>/`:
- `en_db.json`: {"{layer}_{index}": {explanation, correlation_score, tag_list}} for latents whose
  score is >= the cut (default 0.2, as Safe-SAIL's release);
- `indices_layer{L}.pt`: 1-D int64 tensor of the latents kept for layer L (a DB imported from a
  release keeps that release's exact order, duplicates included);
- `quantile_layer{L}.pt`: {"top_neuron_activations", "bottom_neuron_activations"}, each [k, n],
  column j belonging to indices[j]. Tables built by this project are written in ascending order
  along k, the order Safe-SAIL's quantile interpolation expects; imported tables are written
  exactly as they were read;
- `neurons.jsonl`: everything, one latent per line.
Each file is written to a temporary name and renamed, so a killed export leaves no torn file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from safesail.errors import UserError
from safesail.neurondb.jsonl_dump import dump_jsonl
from safesail.neurondb.store import NeuronDB
from safesail.rundir import atomic_write_text

log = logging.getLogger(__name__)
INDEX_MODES = ("explained", "exported", "all")


def en_db_entries(db: NeuronDB, score_cut: float) -> dict[str, dict]:
    rows = db._all("SELECT l.layer, l.idx, l.hook, e.text, s.value, t.tag_list FROM latents l "
                   "JOIN explanations e ON e.latent_id = l.id JOIN scores s ON s.latent_id = l.id "
                   "LEFT JOIN tag_records t ON t.latent_id = l.id "
                   "WHERE s.value IS NOT NULL AND s.value >= ? ORDER BY l.layer, l.idx", (float(score_cut),))
    out: dict[str, dict] = {}
    for layer, idx, hook, text, value, tags in rows:
        key = f"{layer}_{idx}"
        if key in out:
            raise UserError(f"layer {layer} has several hook points in this DB, which Safe-SAIL's "
                            "\"{layer}_{index}\" keys cannot tell apart; export from a DB with one hook per layer.")
        out[key] = {"explanation": text, "correlation_score": value, "tag_list": json.loads(tags) if tags else []}
    return out


def _save_torch(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _layer_tables(db: NeuronDB, hook: str, indices_mode: str, exported: set[int]):
    """(indices list, top [k, n], bottom [k, n]) for one hook, or None when it has no tables."""
    rows = db._all("SELECT idx, top_acts, bottom_acts, quantile_source, "
                   "EXISTS (SELECT 1 FROM explanations e WHERE e.latent_id = latents.id) FROM latents "
                   "WHERE hook = ? AND top_acts IS NOT NULL ORDER BY idx", (hook,))
    tables = {r[0]: r for r in rows}
    order = [r[0] for r in db._all("SELECT idx FROM release_indices WHERE hook = ? ORDER BY position", (hook,))]
    if not order:
        if indices_mode == "all":
            order = sorted(tables)
        elif indices_mode == "exported":
            order = sorted(i for i in tables if i in exported)
        else:
            order = sorted(i for i, r in tables.items() if r[4])
    missing = [i for i in order if i not in tables]
    if missing:
        log.warning("%s: %d indexed latents have no activation tables (e.g. %d); left out", hook, len(missing),
                    missing[0])
        order = [i for i in order if i in tables]
    if not order:
        return None
    tops, bots = [], []
    for i in order:
        _, top_b, bot_b, src, _ = tables[i]
        top, bot = np.frombuffer(top_b, dtype="<f4"), np.frombuffer(bot_b, dtype="<f4")
        if src == "stats":  # our own tables (top descending, bottom ascending) -> ascending, as Safe-SAIL expects
            top, bot = np.sort(top), np.sort(bot)
        tops.append(top)
        bots.append(bot)
    ks = {len(t) for t in tops} | {len(b) for b in bots}
    if len(ks) != 1:
        raise UserError(f"the latents of {hook} have activation tables of different lengths {sorted(ks)}; "
                        "rebuild the DB from one `safesail collect` run.")
    return (np.asarray(order, dtype=np.int64), np.stack(tops, axis=1).astype(np.float32),
            np.stack(bots, axis=1).astype(np.float32))


def export_release(db: NeuronDB, out_dir: Path, score_cut: float = 0.2, indices_mode: str = "explained",
                   jsonl: bool = True) -> dict:
    if indices_mode not in INDEX_MODES:
        raise UserError(f"indices mode {indices_mode!r} is unknown; use one of {', '.join(INDEX_MODES)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = en_db_entries(db, score_cut)
    atomic_write_text(out_dir / "en_db.json", json.dumps(entries, indent=1, ensure_ascii=False))
    os.chmod(out_dir / "en_db.json", 0o644)
    summary = {"entries": len(entries), "tagged": sum(1 for e in entries.values() if e["tag_list"]), "layers": {}}
    for sae in db.saes():
        layer = sae["layer"]
        exported = {int(k.split("_")[1]) for k in entries if int(k.split("_")[0]) == layer}
        t = _layer_tables(db, sae["hook"], indices_mode, exported)
        if t is None:
            continue
        idx, top, bot = t
        _save_torch(torch.from_numpy(idx), out_dir / f"indices_layer{layer}.pt")
        _save_torch({"top_neuron_activations": torch.from_numpy(top),
                     "bottom_neuron_activations": torch.from_numpy(bot)}, out_dir / f"quantile_layer{layer}.pt")
        summary["layers"][layer] = {"indices": int(len(idx)), "k": int(top.shape[0])}
    if jsonl:
        summary["jsonl_lines"] = dump_jsonl(db, out_dir / "neurons.jsonl")
    log.info("exported %s to %s", summary, out_dir)
    return summary
