"""`safesail db build`: make or update `runs/<name>/neurons.sqlite` from the run's outputs.

The whole build is one SQLite transaction on a WAL-mode file:
- readers see the previous complete DB until the build commits; a build killed
  halfway rolls back and leaves the previous DB as it was;
- a hook whose chosen SAE changed has its old rows deleted and the new ones
  written inside that same transaction, so the old SAE's rows stay visible
  until the new ones are complete;
- only what changed is rewritten: latent stats and segments of a hook are
  reloaded only when their file hashes changed (recorded in the `inputs`
  table), and explanation / score / tag rows only where the last JSONL record
  for that latent differs from the one stored (`record_hash`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from safesail.errors import UserError
from safesail.hooks import HookPoint
from safesail.neurondb import files, inputs, load_verify, rows, schema
from safesail.neurondb.store import NeuronDB, f32_blob, i32_blob
from safesail.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class HookInputs:
    hook: str
    layer: int
    sae_folder: Path
    sae_cfg: dict
    latent_dir: Path
    sae_path: str = ""                    # SAE folder as stored in the DB (relative to the run dir)
    hashes: dict[str, str] = field(default_factory=dict)


def plan(cfg, rd: RunDir) -> tuple[list[HookInputs], dict[str, str | None]]:
    """The hooks to build and the hashes of every file the build reads."""
    chosen = inputs.chosen_sae_folders(cfg, rd)
    collected = {p.parent.name: p.parent for p in sorted((rd.root / "latents").glob("*/stats.safetensors"))}
    if not collected:
        raise UserError(f"{rd.root} has no collected latents (latents/<hook>/stats.safetensors); run "
                        "`safesail collect` (and explain, score, tag) before `safesail db build`.")
    model = cfg.model.name
    hooks = []
    for dirname, latent_dir in collected.items():
        meta_path = latent_dir / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        hook = str(meta.get("hook") or dirname)
        if meta.get("model") and meta["model"] != model:
            raise UserError(f"{latent_dir} was collected on model {meta['model']!r}, but this run's model is "
                            f"{model!r}; re-run `safesail collect` or pick the matching model=... .")
        folder = chosen.get(hook)
        if folder is None and meta.get("sae"):
            folder = Path(meta["sae"]) if Path(meta["sae"]).is_absolute() else rd.root / meta["sae"]
        if folder is None:
            raise UserError(f"no SAE is chosen for hook {hook}; run `safesail select` first.")
        sae_cfg = inputs.read_sae_cfg(folder)
        hi = HookInputs(hook=hook, layer=HookPoint.parse(hook).layer, sae_folder=folder, sae_cfg=sae_cfg,
                        latent_dir=latent_dir)
        try:  # stored relative to the run dir, so a moved run directory keeps its DB valid
            hi.sae_path = str(Path(folder).resolve().relative_to(rd.root.resolve()))
        except ValueError:
            hi.sae_path = str(Path(folder).resolve())
        hi.hashes = {"sae_cfg": inputs.sha256_file(folder / "cfg.json"),
                     "sae_weights": inputs.sha256_file(folder / "sae.safetensors"),
                     "stats": inputs.sha256_file(latent_dir / "stats.safetensors"),
                     "meta": inputs.sha256_file(meta_path),
                     "segments": inputs.sha256_file(latent_dir / "segments.jsonl")}
        hi.hashes = {k: v or "" for k, v in hi.hashes.items()}  # "" = file absent
        hooks.append(hi)
    interp = {name: inputs.sha256_file(interpret_file(rd, name)) for name in inputs.INTERPRET_FILES}
    interp[load_verify.NAME] = inputs.sha256_file(rd.effects_file)
    return hooks, interp


def fingerprint_of(hooks: list[HookInputs], interp: dict, db_cfg) -> dict:
    return {"hooks": {h.hook: {"folder": h.sae_path, **h.hashes} for h in hooks}, "interpret": interp,
            "examples_per_latent": db_cfg.get("examples_per_latent") if db_cfg is not None else None}


def build_db(cfg, rd: RunDir, db_path: Path | None = None,
             on_hook_done: Callable[[str], None] | None = None) -> dict:
    """Build or update the neuron DB; returns a summary of what changed."""
    db_path = Path(db_path or rd.neuron_db)
    hooks, interp = plan(cfg, rd)
    max_examples = cfg.get("db", {}).get("examples_per_latent")
    rec = rd.stage_record("db") or {}
    built_here = str((rec.get("summary") or {}).get("db") or "") == str(db_path)
    aside = set_aside_if_corrupt(db_path, built_here)
    db = NeuronDB.create_or_open(db_path, cfg.model.name, cfg.run.name, "safesail-run")
    summary = {"set_aside": aside, "hooks_replaced": [], "hooks_removed": [], "hooks_stats_reloaded": [], "latents": 0,
               "segments": 0, "explanations": 0, "scores": 0, "tags": 0, "verify_effects": 0}
    try:
        with db.transaction() as c:
            gone = [r[0] for r in c.execute("SELECT hook FROM saes WHERE layout = 'safesail' ORDER BY hook")
                    if r[0] not in {hi.hook for hi in hooks}]
            for hook in gone:  # built from this run before, no longer collected/chosen
                log.info("hook %s is no longer in the run; removing its rows", hook)
                c.execute("DELETE FROM saes WHERE hook = ?", (hook,))
                c.execute("DELETE FROM inputs WHERE hook = ?", (hook,))
                summary["hooks_removed"].append(hook)
            for hi in tqdm(hooks, desc="db build", unit="hook"):
                _build_hook(c, hi, max_examples, summary)
                if on_hook_done:
                    on_hook_done(hi.hook)
            built = {hi.hook: hi for hi in hooks}
            stored = {r[0]: r[1] for r in c.execute("SELECT name, sha256 FROM inputs WHERE hook = ''")}
            replaced = bool(summary["hooks_replaced"])
            for name in inputs.INTERPRET_FILES:
                if interp[name] is not None and (replaced or stored.get(name) != interp[name]):
                    recs = read_records(rd, name)
                    summary[name] = _upsert_records(c, name, recs, built)
                    c.execute("INSERT OR REPLACE INTO inputs(hook, name, sha256) VALUES ('', ?, ?)",
                              (name, interp[name]))
            v = interp[load_verify.NAME]
            if v is not None and (replaced or stored.get(load_verify.NAME) != v):
                summary["verify_effects"] = load_verify.load_effects(c, rd.effects_file)
                c.execute("INSERT OR REPLACE INTO inputs(hook, name, sha256) VALUES ('', ?, ?)", (load_verify.NAME, v))
            db.set_meta("run", cfg.run.name)
            db.set_meta("source", "safesail-run")
    finally:
        db.close()
    log.info("neuron DB %s: %s", db_path, summary)
    return summary


def set_aside_if_corrupt(db_path: Path, built_here: bool = False) -> str | None:
    """Integrity check before a write: a corrupt neuron DB is renamed aside (kept) so the write starts afresh.

    A file counts as a neuron DB when its header carries our application id, or when
    `built_here` (the run's stage record says this path was built by it); anything else
    is left alone (opening it then refuses it with one sentence).
    """
    if not db_path.exists() or files.is_schemaless(db_path):
        return None
    problem = files.integrity_problem(db_path)
    if problem is None:
        return None
    if not built_here and files.header_application_id(db_path) != schema.APPLICATION_ID:
        return None
    aside = files.set_aside(db_path)
    log.warning("%s is corrupt (%s); kept it as %s and building a fresh DB", db_path, problem, aside)
    return str(aside)


def _build_hook(c, hi: HookInputs, max_examples, summary: dict) -> None:
    scfg = hi.sae_cfg
    old = c.execute("SELECT id, path FROM saes WHERE hook = ?", (hi.hook,)).fetchone()
    stored = {r[0]: r[1] for r in c.execute("SELECT name, sha256 FROM inputs WHERE hook = ?", (hi.hook,))}
    new_sae = old is None or old[1] != hi.sae_path or stored.get("sae_weights") != hi.hashes["sae_weights"]
    if old is not None and new_sae:
        log.info("hook %s: new SAE %s replaces %s", hi.hook, hi.sae_path, old[1])
        c.execute("DELETE FROM saes WHERE id = ?", (old[0],))  # cascades to its latents and their rows
        c.execute("DELETE FROM inputs WHERE hook = ?", (hi.hook,))
        c.execute("DELETE FROM release_indices WHERE hook = ?", (hi.hook,))
        summary["hooks_replaced"].append(hi.hook)
        stored = {}
    row = (hi.hook, hi.layer, scfg.get("arch"), scfg.get("k"), scfg.get("n_latents"), scfg.get("d_in"),
           hi.sae_path, "safesail", json.dumps(scfg, sort_keys=True))
    c.execute("INSERT INTO saes(hook, layer, arch, k, width, d_in, path, layout, cfg) VALUES (?,?,?,?,?,?,?,?,?) "
              "ON CONFLICT(hook) DO UPDATE SET layer=excluded.layer, arch=excluded.arch, k=excluded.k, "
              "width=excluded.width, d_in=excluded.d_in, path=excluded.path, layout=excluded.layout, "
              "cfg=excluded.cfg", row)
    sae_id = c.execute("SELECT id FROM saes WHERE hook = ?", (hi.hook,)).fetchone()[0]
    if stored.get("stats") != hi.hashes["stats"] or stored.get("meta") != hi.hashes["meta"]:
        summary["latents"] += _load_stats(c, sae_id, hi)
        summary["hooks_stats_reloaded"].append(hi.hook)
    if stored.get("segments") != hi.hashes["segments"]:
        summary["segments"] += _load_segments(c, sae_id, hi, max_examples)
    c.executemany("INSERT OR REPLACE INTO inputs(hook, name, sha256) VALUES (?, ?, ?)",
                  [(hi.hook, k, v) for k, v in hi.hashes.items()])


def _load_stats(c, sae_id: int, hi: HookInputs) -> int:
    st = inputs.read_stats(hi.latent_dir / "stats.safetensors")
    meta_path = hi.latent_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    ntok = meta.get("num_tokens")
    ids = st["latent_ids"]
    m = len(ids)
    for k in ("density", "top_acts", "bottom_acts", "quantile_999", "max_act"):
        if st[k].shape[0] != m:
            raise UserError(f"{hi.latent_dir}/stats.safetensors: {k} has {st[k].shape[0]} rows for {m} latent ids; "
                            "re-run `safesail collect`.")
    hc, he = st.get("hist_counts"), st.get("hist_edges")

    def rows():
        for i in range(m):
            yield (sae_id, hi.hook, hi.layer, int(ids[i]), float(st["density"][i]), float(st["quantile_999"][i]),
                   "stats", float(st["max_act"][i]), ntok,
                   f32_blob(hc[i]) if hc is not None else None, f32_blob(he[i]) if he is not None else None,
                   f32_blob(st["top_acts"][i]), f32_blob(st["bottom_acts"][i]))

    c.executemany(
        "INSERT INTO latents(sae_id, hook, layer, idx, density, quantile_999, quantile_source, max_act, num_tokens, "
        "hist_counts, hist_edges, top_acts, bottom_acts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) "
        "ON CONFLICT(hook, idx) DO UPDATE SET sae_id=excluded.sae_id, layer=excluded.layer, "
        "density=excluded.density, quantile_999=excluded.quantile_999, quantile_source=excluded.quantile_source, "
        "max_act=excluded.max_act, num_tokens=excluded.num_tokens, hist_counts=excluded.hist_counts, "
        "hist_edges=excluded.hist_edges, top_acts=excluded.top_acts, bottom_acts=excluded.bottom_acts", rows())
    return m


def _latent_ids(c, hook: str) -> dict[int, int]:
    return {idx: lid for lid, idx in c.execute("SELECT id, idx FROM latents WHERE hook = ?", (hook,))}


def _load_segments(c, sae_id: int, hi: HookInputs, max_examples) -> int:
    c.execute("DELETE FROM segments WHERE latent_id IN (SELECT id FROM latents WHERE hook = ?)", (hi.hook,))
    ids = _latent_ids(c, hi.hook)
    ranks: dict[int, int] = {}
    unknown: set[int] = set()

    def rows():
        for s in inputs.iter_segments(hi.latent_dir / "segments.jsonl"):
            idx = int(s["latent"])
            if idx not in ids:
                unknown.add(idx)
                continue
            r = ranks.get(idx, 0)
            if max_examples is not None and r >= max_examples:
                continue
            ranks[idx] = r + 1
            yield (ids[idx], r, _str(s.get("segment_id")), s.get("split"), s.get("kind"),
                   s.get("level"), _str(s.get("doc_id")), s.get("start"), i32_blob(s.get("token_ids")),
                   json.dumps(s.get("tokens"), ensure_ascii=False), f32_blob(s.get("acts")))

    sql = ("INSERT INTO segments(latent_id, rank, segment_id, split, kind, level, doc_id, start, token_ids, "
           "tokens, acts) VALUES (?,?,?,?,?,?,?,?,?,?,?)")
    batch: list[tuple] = []
    for row in rows():
        batch.append(row)
        if len(batch) >= 10000:
            c.executemany(sql, batch)
            batch.clear()
    c.executemany(sql, batch)
    if unknown:
        log.warning("%s/segments.jsonl has segments of %d latents missing from stats.safetensors; skipped",
                    hi.latent_dir, len(unknown))
    return sum(ranks.values())


def _str(x):
    return None if x is None else str(x)


def _same_sae(rec: dict, folder: Path) -> bool:
    """False when a record names the SAE it was made for and that is not the chosen one."""
    sae = rec.get("sae")
    return not sae or Path(str(sae)).name == folder.name or str(folder).endswith(str(sae))


def interpret_file(rd: RunDir, name: str) -> Path:
    return {"explanations": rd.explanations_file, "scores": rd.scores_file, "tags": rd.tags_file}[name]


def read_records(rd: RunDir, name: str) -> dict[tuple, dict]:
    """The last record per key of one interpret file: (hook, latent) for explanations and tags,
    (hook, latent, kind) for scores, each read through its stage's own typed reader."""
    path = interpret_file(rd, name)
    if name == "scores":
        from safesail.interpret.scoring.records import ScoreRecord, read_scores

        # a shallow dict of the record's fields: dataclasses.asdict would deep-copy every details payload
        names = tuple(ScoreRecord.__dataclass_fields__)
        return {key: {n: getattr(r, n) for n in names} for key, r in read_scores(path).items()}
    from safesail.interpret.records import read_explanations, read_tags

    # the interpret stages' own typed readers (malformed lines are skipped the same way there and here);
    # `to_json` keeps the record's unknown keys (sae, lang, ...) for the row writers
    reader = read_explanations if name == "explanations" else read_tags
    return {key: r.to_json() for key, r in reader(path).items()}


_TABLES = {"explanations": ("explanations", "t.latent_id"), "scores": ("scores", "t.latent_id || '/' || t.kind"),
           "tags": ("tag_records", "t.latent_id")}
_WRITERS = {"explanations": rows.write_explanation_record, "scores": rows.write_score_record,
            "tags": rows.write_tag_record}


def _row_key(name: str, lid: int, rec: dict) -> str | int:
    return f"{lid}/{rows.score_kind(rec)}" if name == "scores" else lid


def _upsert_records(c, name: str, recs: dict, built: dict[str, HookInputs]) -> int:
    """Write the interpret records whose content changed; returns how many rows were written.

    Records of latents the hook's collected stats do not list (e.g. left over from a previous
    SAE) and records naming another SAE are skipped.
    """
    table, key_sql = _TABLES[name]
    changed = 0
    by_hook: dict[str, list[dict]] = {}
    for key, rec in recs.items():
        by_hook.setdefault(key[0], []).append(rec)
    for hook in sorted(set(by_hook) - set(built)):
        log.warning("%s.jsonl has records for hook %s, which has no collected latents; skipped", name, hook)
    for hook in sorted(set(by_hook) & set(built)):
        ids = _latent_ids(c, hook)
        skipped = 0
        have = {k: h for k, h in c.execute(
            f"SELECT {key_sql}, t.record_hash FROM {table} t JOIN latents l ON l.id = t.latent_id "
            "WHERE l.hook = ?", (hook,))}
        for rec in by_hook[hook]:
            lid = ids.get(int(rec["latent"]))
            if lid is None or not _same_sae(rec, built[hook].sae_folder):
                skipped += 1
                continue
            h = inputs.record_hash(rec)
            if have.get(_row_key(name, lid, rec)) == h:
                continue
            changed += 1
            _WRITERS[name](c, lid, rec, h)
        if skipped:
            log.warning("%s.jsonl: %d records of %s are for latents the chosen SAE's collected stats do not "
                        "list; skipped", name, skipped, hook)
    return changed
