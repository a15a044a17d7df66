"""`safesail db export`: write Safe-SAIL's release layout (and JSONL dumps) from a neuron DB.

Into `<out>/`:
- `en_db.json` (and `cn_db.json`, ... for every other language the DB holds explanations in):
  {"{layer}_{index}": {explanation, correlation_score, tag_list}} for latents whose simulation
  score (`correlation_score`) is >= the cut (default 0.2, as Safe-SAIL's release). Entries
  imported from a release are written in that file's own bytes: its entry order, each entry's
  key order and number spelling, and its layout (`json.dumps(d)`, one ASCII line, for the
  published files). Entries of our own runs use the readable layout (`indent=1`, UTF-8,
  sorted by layer and index);
- `indices_layer{L}.pt`: 1-D int64 tensor of the latents kept for layer L (a DB imported from a
  release keeps that release's exact order, duplicates included, with or without tables);
- `quantile_layer{L}.pt`: {"top_neuron_activations", "bottom_neuron_activations"}, each [k, n],
  column j belonging to indices[j], when every indexed latent has tables. Tables built by this
  project are written in ascending order along k, the order Safe-SAIL's quantile interpolation
  expects; imported tables are written exactly as they were read;
- `neurons.jsonl`: everything, one latent per line; `verify.jsonl`: every causal-check result.
Each file is written to a temporary name and renamed, so a killed export leaves no torn file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from safesail import layout
from safesail.atomic import atomic_torch_save, atomic_write_text
from safesail.domains import SCORE_CUT
from safesail.errors import UserError
from safesail.neurondb import load_verify
from safesail.neurondb.jsonl_dump import dump_jsonl
from safesail.neurondb.rows import DEFAULT_KIND
from safesail.neurondb.store import NeuronDB

log = logging.getLogger(__name__)
INDEX_MODES = ("explained", "exported", "all")
LAYOUTS = {"dumps": lambda d: json.dumps(d),                                     # Safe-SAIL's published files
           "readable": lambda d: json.dumps(d, indent=1, ensure_ascii=False)}   # our own runs


def _entry(raw: str | None, text, value, tags: list) -> dict:
    """An entry with the current values; an imported entry keeps its own key order and, where the
    values are unchanged, its own spelling (an integer score stays an integer)."""
    now = {"explanation": text, "correlation_score": value, "tag_list": tags}
    if raw is None:
        return now
    old = json.loads(raw)
    if set(old) != set(now):
        return now
    return {k: old[k] if old[k] == now[k] else now[k] for k in old}


def db_langs(db: NeuronDB) -> list[str]:
    langs = [r[0] for r in db._all("SELECT DISTINCT lang FROM explanation_langs")]
    return sorted(langs, key=lambda x: (x != "en", x)) or ["en"]


def lang_entries(db: NeuronDB, score_cut: float, lang: str = "en") -> tuple[dict[str, dict], str]:
    """(entries in file order, layout) of `{lang}_db.json`."""
    rows = db._all("SELECT l.layer, l.idx, x.text, s.value, t.tag_list, r.position, r.raw FROM latents l "
                   "JOIN explanation_langs x ON x.latent_id = l.id AND x.lang = ? "
                   "JOIN scores s ON s.latent_id = l.id AND s.kind = ? "
                   "LEFT JOIN tag_records t ON t.latent_id = l.id "
                   "LEFT JOIN release_entries r ON r.latent_id = l.id AND r.lang = x.lang "
                   "WHERE s.value IS NOT NULL AND s.value >= ? "
                   "ORDER BY r.position IS NULL, r.position, l.layer, l.idx", (lang, DEFAULT_KIND, float(score_cut)))
    out: dict[str, dict] = {}
    for layer, idx, text, value, tags, _pos, raw in rows:
        key = f"{layer}_{idx}"
        if key in out:
            raise UserError(f"layer {layer} has several hook points in this DB, which Safe-SAIL's "
                            "\"{layer}_{index}\" keys cannot tell apart; export from a DB with one hook per layer.")
        out[key] = _entry(raw, text, value, json.loads(tags) if tags else [])
    imported = bool(rows) and all(r[6] is not None for r in rows)
    layout = (db.model_info().get(f"release_layout_{lang}") or "dumps") if imported else "readable"
    return out, layout


def en_db_entries(db: NeuronDB, score_cut: float) -> dict[str, dict]:
    return lang_entries(db, score_cut, "en")[0]


def _save_torch(obj, path: Path) -> None:
    atomic_torch_save(obj, path)


def _layer_tables(db: NeuronDB, hook: str, indices_mode: str, exported: set[int]):
    """(indices, top [k, n], bottom [k, n]) for one hook (tables None: indices only), or None for nothing."""
    rows = db._all("SELECT idx, top_acts, bottom_acts, quantile_source, "
                   "EXISTS (SELECT 1 FROM explanations e WHERE e.latent_id = latents.id) FROM latents "
                   "WHERE hook = ? AND top_acts IS NOT NULL ORDER BY idx", (hook,))
    tables = {r[0]: r for r in rows}
    order = [r[0] for r in db._all("SELECT idx FROM release_indices WHERE hook = ? ORDER BY position", (hook,))]
    from_release = bool(order)
    if not order:
        if indices_mode == "all":
            order = sorted(tables)
        elif indices_mode == "exported":
            order = sorted(i for i in tables if i in exported)
        else:
            order = sorted(i for i, r in tables.items() if r[4])
    missing = [i for i in order if i not in tables]
    if missing and from_release:
        log.info("%s: %d of the release's indexed latents have no activation tables (e.g. %d); writing the "
                 "indices as imported, without a quantile file", hook, len(missing), missing[0])
        return np.asarray(order, dtype=np.int64), None, None
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


def export_release(db: NeuronDB, out_dir: Path, score_cut: float = SCORE_CUT, indices_mode: str = "explained",
                   jsonl: bool = True) -> dict:
    if indices_mode not in INDEX_MODES:
        raise UserError(f"indices mode {indices_mode!r} is unknown; use one of {', '.join(INDEX_MODES)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"entries": 0, "tagged": 0, "files": [], "layers": {}}
    exported: dict[int, set[int]] = {}
    for lang in db_langs(db):
        entries, fmt = lang_entries(db, score_cut, lang)
        if not entries and lang != "en":
            continue
        name = f"{lang}_db.json"
        atomic_write_text(out_dir / name, LAYOUTS[fmt](entries))
        summary["files"].append(name)
        for k in entries:
            layer, idx = map(int, k.split("_"))
            exported.setdefault(layer, set()).add(idx)
        if lang == "en" or not summary["entries"]:
            summary["entries"] = len(entries)
            summary["tagged"] = sum(1 for e in entries.values() if e["tag_list"])
    for sae in db.saes():
        layer = sae["layer"]
        t = _layer_tables(db, sae["hook"], indices_mode, exported.get(layer, set()))
        if t is None:
            continue
        idx, top, bot = t
        _save_torch(torch.from_numpy(idx), out_dir / layout.release_indices(layer))
        summary["layers"][layer] = {"indices": int(len(idx)), "k": None if top is None else int(top.shape[0])}
        if top is not None:
            _save_torch({"top_neuron_activations": torch.from_numpy(top),
                         "bottom_neuron_activations": torch.from_numpy(bot)}, out_dir / layout.release_quantiles(layer))
    effects = list(load_verify.all_effects(db.conn))
    if effects:
        atomic_write_text(out_dir / layout.VERIFY_EXPORT,
                          "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in effects))
        summary["verify_effects"] = len(effects)
    if jsonl:
        summary["jsonl_lines"] = dump_jsonl(db, out_dir / layout.NEURONS_JSONL)
    log.info("exported %s to %s", summary, out_dir)
    return summary
