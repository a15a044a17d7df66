"""`safesail db import`: load Safe-SAIL's released files into a neuron DB.

Reads (layouts in docs/neuron-db.md and ../shared/reference/safe-sail-artifacts.md):
- `en_db.json` / `cn_db.json`: {"{layer}_{index}": {explanation, correlation_score, tag_list}};
  masked "***" and null explanations are kept as they are;
- `indices_layer{L}.pt` (1-D int64, order and duplicates kept) with `quantile_layer{L}.pt`
  ({top,bottom}_neuron_activations [k, n_selected], aligned with the indices): each latent's
  0.999 quantile is approximated from its top-k column as Safe-SAIL does;
- `ckpt_layer{L}.pt` SAE checkpoints: keys and shapes are checked and the path is recorded
  (layout "safesail-ckpt"), the weights stay where they are.
Every file is read and checked before the DB is touched; the write is one transaction.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from safesail.domains import SAFESAIL_ARCH, SAFESAIL_HOOK_SITE, SAFESAIL_K, SAFESAIL_NUM_TOKENS, SAFESAIL_QUANTILE
from safesail.errors import UserError
from safesail.neurondb.approx_quantile import approximate_upper_quantile
from safesail.neurondb import rows
from safesail.neurondb.build import set_aside_if_corrupt
from safesail.neurondb.store import NeuronDB, f32_blob

log = logging.getLogger(__name__)

_KEY = re.compile(r"^(\d+)_(\d+)$")
_FILE = re.compile(r"^(indices|quantile|ckpt)_layer(\d+)\.pt$")
ENTRY_FIELDS = {"explanation", "correlation_score", "tag_list"}


@dataclass
class LayerFiles:
    indices: np.ndarray | None = None          # int64 [n_selected]
    top: np.ndarray | None = None              # float32 [k, n_selected]
    bottom: np.ndarray | None = None
    ckpt: dict | None = None                   # {"path", "arch", "width", "d_in"}


@dataclass
class LangEntries:
    """One language's neuron-DB file (en_db.json / cn_db.json), entries in the file's order."""
    file: str
    entries: dict[tuple[int, int], dict] = field(default_factory=dict)
    raw: dict[tuple[int, int], str] = field(default_factory=dict)   # json.dumps of each entry as read
    layout: str = "dumps"       # how the file was written: "dumps" (json.dumps(d), the release) or "readable"


@dataclass
class Release:
    langs: dict[str, LangEntries] = field(default_factory=dict)
    layers: dict[int, LayerFiles] = field(default_factory=dict)

    @property
    def entries(self) -> dict[tuple[int, int], dict]:
        """Every neuron with an entry in any language (English values where both exist)."""
        out: dict[tuple[int, int], dict] = {}
        for lang in sorted(self.langs, key=lambda x: x != "en"):
            for key, e in self.langs[lang].entries.items():
                out.setdefault(key, e)
        return out


LFS_MAGIC = b"version https://git-lfs.github.com/spec/"


def refuse_lfs_pointer(path: Path, what: str) -> None:
    """A Git LFS pointer file (a clone made without `git lfs`) is named as such, not as a broken file."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_MAGIC))
    except OSError:
        return
    if head == LFS_MAGIC:
        raise UserError(f"{path} is a Git LFS pointer file ({Path(path).stat().st_size} bytes), not Safe-SAIL's "
                        f"{what} itself; fetch the data (`git lfs pull` in the release's clone, or download the "
                        "file) and import again.")


def lang_of(path: Path, given: str | None = None) -> str:
    """The language of a neuron-DB file: --lang, else its name (en_db.json -> en, cn_db.json -> cn), else en."""
    if given:
        return given
    m = re.match(r"^([a-z]{2})_db\b", Path(path).name)
    return m.group(1) if m else "en"


# ---- reading and checking ------------------------------------------------------
def _no_duplicates(path: Path):
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise UserError(f"{path} has the key {k!r} twice; keep one entry per neuron and import again.")
            seen.add(k)
        return dict(pairs)
    return hook


def read_db_json(path: Path) -> dict[tuple[int, int], dict]:
    """Entries of a Safe-SAIL `en_db.json` / `cn_db.json`, keyed (layer, index), in the file's order."""
    return read_db_file(path, "en").entries


def read_db_file(path: Path, lang: str) -> LangEntries:
    """A Safe-SAIL `en_db.json` / `cn_db.json`: entries keyed (layer, index) and each entry's own JSON."""
    path = Path(path)
    if path.is_file():
        refuse_lfs_pointer(path, "neuron DB (en_db.json / cn_db.json)")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text, object_pairs_hook=_no_duplicates(path))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass the path of Safe-SAIL's en_db.json or cn_db.json.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); pass Safe-SAIL's en_db.json or cn_db.json.") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path} is not a Safe-SAIL neuron DB (expected a non-empty object keyed "
                        "\"{layer}_{index}\"); pass Safe-SAIL's en_db.json or cn_db.json.")
    out = LangEntries(file=path.name, layout=file_layout(data, text))
    for key, entry in data.items():
        m = _KEY.match(key)
        bad = None
        if not m:
            bad = f"key {key!r} is not of the form \"{{layer}}_{{index}}\""
        elif not isinstance(entry, dict) or set(entry) != ENTRY_FIELDS:
            bad = f"entry {key!r} does not have exactly the fields {sorted(ENTRY_FIELDS)}"
        elif entry["explanation"] is not None and not isinstance(entry["explanation"], str):
            bad = f"entry {key!r} has an explanation that is neither text nor null"
        elif (isinstance(entry["correlation_score"], bool) or not isinstance(entry["correlation_score"], (int, float))
              or not math.isfinite(entry["correlation_score"])):
            bad = f"entry {key!r} has a correlation_score that is not a number"
        elif not isinstance(entry["tag_list"], list) or not all(isinstance(t, str) for t in entry["tag_list"]):
            bad = f"entry {key!r} has a tag_list that is not a list of strings"
        if bad:
            raise UserError(f"{path} is not in Safe-SAIL's neuron-DB layout: {bad}.")
        k = (int(m.group(1)), int(m.group(2)))
        out.raw[k] = json.dumps(entry)
        out.entries[k] = {"explanation": entry["explanation"], "correlation_score": float(entry["correlation_score"]),
                          "tag_list": list(entry["tag_list"])}
    return out


def file_layout(data: dict, text: str) -> str:
    """Which of the two layouts (`export_safesail.LAYOUTS`) wrote `text`; "dumps" when neither did exactly."""
    from safesail.neurondb.export_safesail import LAYOUTS

    for name, dump in LAYOUTS.items():
        if dump(data) == text:
            return name
    return "dumps"


def _torch_load(path: Path, what: str):
    refuse_lfs_pointer(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass the path of Safe-SAIL's {what}.") from None
    except Exception as e:  # unpickling errors come in many types
        raise UserError(f"{path} cannot be read as Safe-SAIL's {what} ({type(e).__name__}); check the file.") from None


def read_indices(path: Path) -> np.ndarray:
    t = _torch_load(Path(path), "indices_layer{L}.pt")
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise UserError(f"{path} is not a Safe-SAIL indices file (expected a 1-D integer tensor).")
    if t.numel() and int(t.min()) < 0:
        raise UserError(f"{path} holds negative latent indices; check the file.")
    return t.to(torch.int64).numpy()


def read_quantiles(path: Path, n_indices: int, indices_path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _torch_load(Path(path), "quantile_layer{L}.pt")
    keys = ("top_neuron_activations", "bottom_neuron_activations")
    if not isinstance(d, dict) or not all(isinstance(d.get(k), torch.Tensor) for k in keys):
        raise UserError(f"{path} is not a Safe-SAIL quantile file (expected a dict with {keys[0]} and {keys[1]}).")
    top, bot = d[keys[0]], d[keys[1]]
    if top.ndim != 2 or top.shape != bot.shape:
        raise UserError(f"{path}: the top and bottom tables must both be [k, n_selected], got "
                        f"{tuple(top.shape)} and {tuple(bot.shape)}.")
    if top.shape[1] != n_indices:
        raise UserError(f"{path} has {top.shape[1]} columns but {indices_path} lists {n_indices} indices; "
                        "pass the quantile and indices files of the same layer and release.")
    return top.float().numpy(), bot.float().numpy()


def check_ckpt(path: Path) -> dict:
    """Keys and shapes of a Safe-SAIL SAE checkpoint; returns {path, arch, width, d_in}."""
    path = Path(path)
    refuse_lfs_pointer(path, "ckpt_layer{L}.pt")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        sd = _torch_load(path, "ckpt_layer{L}.pt")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; pass the path of Safe-SAIL's ckpt_layer{{L}}.pt.") from None
    except Exception as e:
        raise UserError(f"{path} cannot be read as a Safe-SAIL SAE checkpoint ({type(e).__name__}).") from None
    need = ("pre_encoder_bias._bias_reference", "encoder.weight", "encoder.bias")
    if not isinstance(sd, dict) or not all(isinstance(sd.get(k), torch.Tensor) for k in need):
        raise UserError(f"{path} is not a Safe-SAIL SAE checkpoint (it needs the keys {', '.join(need)}).")
    w = sd["encoder.weight"]
    if w.ndim != 3 or w.shape[0] != 1:
        raise UserError(f"{path}: encoder.weight must be [1, n_latents, d_in], got {tuple(w.shape)}.")
    _, n, d = w.shape
    expect = {"pre_encoder_bias._bias_reference": (1, d), "encoder.bias": (1, n), "encoder.theta": (1, n),
              "decoder.weight": (1, d, n)}
    for k, shape in expect.items():
        if k in sd and tuple(sd[k].shape) != shape:
            raise UserError(f"{path}: {k} must have shape {list(shape)} for a {n}-latent SAE on {d} inputs, "
                            f"got {list(sd[k].shape)}.")
    return {"path": str(path.resolve()), "arch": "jumprelu" if "encoder.theta" in sd else None, "width": int(n),
            "d_in": int(d)}


def find_release_files(folder: Path) -> dict:
    """Safe-SAIL release files under `folder` (any depth): en_db.json / cn_db.json and *_layer{L}.pt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass the folder of Safe-SAIL's release to --from.")
    found: dict = {"en_db": None, "cn_db": None, "indices": {}, "quantile": {}, "ckpt": {}}
    for p in sorted(folder.rglob("*")):
        if p.name in ("en_db.json", "cn_db.json") and found[p.stem] is None:
            found[p.stem] = p
        m = _FILE.match(p.name)
        if m:
            found[m.group(1)].setdefault(int(m.group(2)), p)
    return found


def layer_of(path: Path, kind: str) -> int:
    m = _FILE.match(Path(path).name)
    if not m or m.group(1) != kind:
        raise UserError(f"{path} is not named {kind}_layer{{L}}.pt; keep Safe-SAIL's file names so the layer is known.")
    return int(m.group(2))


def read_release(db_json, indices: dict[int, Path], quantiles: dict[int, Path],
                 ckpts: dict[int, Path], num_layers: int | None = None, model: str | None = None) -> Release:
    """Read and cross-check every file; raises UserError before anything is written.

    `db_json` is one neuron-DB file, a {lang: file} mapping (en_db.json and cn_db.json side by
    side), or None; `num_layers` (the model's layer count) refuses files of layers it lacks."""
    rel = Release()
    if isinstance(db_json, dict):
        files = dict(db_json)
    else:
        files = {} if db_json is None else {lang_of(db_json): Path(db_json)}
    for lang, path in files.items():
        rel.langs[lang] = read_db_file(path, lang)
    if num_layers is not None:
        _check_layers(rel, files, indices, quantiles, ckpts, int(num_layers), model)
    for layer in sorted(set(quantiles) - set(indices)):
        raise UserError(f"{quantiles[layer]} has no matching indices_layer{layer}.pt; pass both files of a layer.")
    for layer, path in sorted(indices.items()):
        lf = rel.layers.setdefault(layer, LayerFiles())
        lf.indices = read_indices(path)
        if layer in quantiles:
            lf.top, lf.bottom = read_quantiles(quantiles[layer], len(lf.indices), path)
    for layer, path in sorted(ckpts.items()):
        lf = rel.layers.setdefault(layer, LayerFiles())
        lf.ckpt = check_ckpt(path)
    for layer, lf in rel.layers.items():
        if lf.ckpt and lf.indices is not None and lf.indices.size and int(lf.indices.max()) >= lf.ckpt["width"]:
            raise UserError(f"indices_layer{layer}.pt names latent {int(lf.indices.max())}, but the layer-{layer} "
                            f"SAE has only {lf.ckpt['width']} latents; pass files of the same release.")
    for (layer, idx) in rel.entries:
        lf = rel.layers.get(layer)
        if lf and lf.ckpt and idx >= lf.ckpt["width"]:
            raise UserError(f"{'/'.join(e.file for e in rel.langs.values())} names neuron {layer}_{idx}, but the layer-{layer} SAE has only "
                            f"{lf.ckpt['width']} latents; pass files of the same release.")
    if not rel.entries and not rel.layers:
        raise UserError("nothing to import; pass --from <release folder> or --en-db/--cn-db, --indices, "
                        "--quantiles, --ckpt files.")
    return rel


def _check_layers(rel: Release, files: dict, indices: dict, quantiles: dict, ckpts: dict, num_layers: int,
                  model: str | None) -> None:
    named = f"model {model}" if model else "the model"
    for kind, paths in (("indices", indices), ("quantile", quantiles), ("ckpt", ckpts)):
        for layer, path in sorted(paths.items()):
            if not 0 <= layer < num_layers:
                raise UserError(f"{path} is for layer {layer}, but {named} has {num_layers} layers (0-{num_layers - 1}); "
                                "pass the files of this model's release, or the right --model.")
    for lang, le in rel.langs.items():
        bad = sorted({layer for layer, _ in le.entries if not 0 <= layer < num_layers})
        if bad:
            raise UserError(f"{files[lang]} has neurons on layer {bad[0]}, but {named} has {num_layers} layers "
                            f"(0-{num_layers - 1}); pass the files of this model's release, or the right --model.")


# ---- writing --------------------------------------------------------------------
def import_release(db_path: Path, rel: Release, model: str, run: str | None = None, *,
                   num_tokens: int = SAFESAIL_NUM_TOKENS, q: float = SAFESAIL_QUANTILE, sae_k: int = SAFESAIL_K, sae_arch: str = SAFESAIL_ARCH,
                   hook_site: str = SAFESAIL_HOOK_SITE) -> dict:
    """Write a checked release into the DB at `db_path` (created if missing) in one transaction."""
    aside = set_aside_if_corrupt(Path(db_path))
    db = NeuronDB.create_or_open(db_path, model, run, "safesail-release")
    summary = {"entries": len(rel.entries), "layers": sorted({l for l, _ in rel.entries} | set(rel.layers)),
               "latents_with_quantiles": 0, "langs": sorted(rel.langs), "set_aside": aside}
    try:
        with db.transaction() as c:
            sae_ids = {}
            for layer in summary["layers"]:
                sae_ids[layer] = _upsert_sae(c, layer, f"layers.{layer}.{hook_site}", rel.layers.get(layer),
                                             sae_k, sae_arch)
            for layer, lf in sorted(rel.layers.items()):
                if lf.indices is not None:
                    summary["latents_with_quantiles"] += _write_tables(c, sae_ids[layer], layer,
                                                                       f"layers.{layer}.{hook_site}", lf, q, num_tokens)
            for lang, le in rel.langs.items():
                _write_entries(c, sae_ids, hook_site, lang, le)
            db.set_meta("release_quantile", json.dumps({"q": q, "num_tokens": num_tokens}))
    finally:
        db.close()
    log.info("imported %s into %s", summary, db_path)
    return summary


def _write_entries(c, sae_ids: dict[int, int], hook_site: str, lang: str, le: LangEntries) -> None:
    """One language's entries: its explanation beside the other languages', the score (kind simulation:
    Safe-SAIL's correlation_score), the tags, and the entry's place and bytes in the file (for export)."""
    c.execute("DELETE FROM release_entries WHERE lang = ?", (lang,))
    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (f"release_layout_{lang}", le.layout))
    for pos, ((layer, idx), entry) in enumerate(le.entries.items()):
        lid = _latent_row(c, sae_ids[layer], f"layers.{layer}.{hook_site}", layer, idx)
        rows.write_explanation_lang(c, lid, lang, entry["explanation"], le.file)
        if rows.takes_primary(c, lid, lang):
            c.execute("INSERT OR REPLACE INTO explanations(latent_id, text, status, llm, prompt_version, lang) "
                      "VALUES (?, ?, 'ok', 'safesail-release', ?, ?)", (lid, entry["explanation"], le.file, lang))
        rows.write_score(c, lid, rows.DEFAULT_KIND, {"value": entry["correlation_score"], "status": "ok",
                                                     "details": json.dumps({"source": le.file})})
        rows.write_tag_list(c, lid, entry["tag_list"])
        c.execute("INSERT INTO release_entries(lang, position, latent_id, raw) VALUES (?, ?, ?, ?)",
                  (lang, pos, lid, le.raw[(layer, idx)]))


def _upsert_sae(c, layer: int, hook: str, lf: LayerFiles | None, sae_k: int, sae_arch: str) -> int:
    ck = lf.ckpt if lf else None
    old = c.execute("SELECT id, path, width, d_in, arch FROM saes WHERE hook = ?", (hook,)).fetchone()
    if ck:
        arch = ck["arch"] or sae_arch
        row = (arch, sae_k if arch == "topk" else None, ck["width"], ck["d_in"], ck["path"])
    elif old:
        return old[0]
    else:
        row = (sae_arch, sae_k if sae_arch == "topk" else None, None, None, None)
    c.execute("INSERT INTO saes(hook, layer, arch, k, width, d_in, path, layout) VALUES (?,?,?,?,?,?,?, 'safesail-ckpt') "
              "ON CONFLICT(hook) DO UPDATE SET arch=excluded.arch, k=excluded.k, width=excluded.width, "
              "d_in=excluded.d_in, path=excluded.path, layout=excluded.layout", (hook, layer, *row))
    return c.execute("SELECT id FROM saes WHERE hook = ?", (hook,)).fetchone()[0]


def _latent_row(c, sae_id: int, hook: str, layer: int, idx: int) -> int:
    c.execute("INSERT OR IGNORE INTO latents(sae_id, hook, layer, idx) VALUES (?, ?, ?, ?)", (sae_id, hook, layer, idx))
    return c.execute("SELECT id FROM latents WHERE hook = ? AND idx = ?", (hook, idx)).fetchone()[0]


def _write_tables(c, sae_id: int, layer: int, hook: str, lf: LayerFiles, q: float, num_tokens: int) -> int:
    c.execute("DELETE FROM release_indices WHERE hook = ?", (hook,))
    c.executemany("INSERT INTO release_indices(hook, position, idx) VALUES (?, ?, ?)",
                  [(hook, i, int(x)) for i, x in enumerate(lf.indices)])
    if lf.top is None:
        return 0
    k = lf.top.shape[0]
    qs = approximate_upper_quantile(lf.top, q, num_tokens)
    src = f"safesail-top{k}(q={q},N={num_tokens})"
    first: dict[int, int] = {}
    for col, idx in enumerate(lf.indices.tolist()):
        if idx in first:
            j = first[idx]
            if not (np.array_equal(lf.top[:, j], lf.top[:, col]) and np.array_equal(lf.bottom[:, j], lf.bottom[:, col])):
                log.warning("layer %d latent %d appears twice in the indices with different tables; "
                            "keeping the first", layer, idx)
            continue
        first[idx] = col
        lid = _latent_row(c, sae_id, hook, layer, idx)
        c.execute("UPDATE latents SET quantile_999 = ?, quantile_source = ?, num_tokens = ?, top_acts = ?, "
                  "bottom_acts = ?, max_act = ? WHERE id = ?",
                  (float(qs[col]), src, num_tokens, f32_blob(lf.top[:, col]), f32_blob(lf.bottom[:, col]),
                   float(lf.top[:, col].max()), lid))
    return len(first)
