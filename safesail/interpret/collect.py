"""The `collect` stage: latent statistics and example segments of the chosen SAEs.

Pass 1 streams the explanation corpus through the model once, encodes every hook
point's activations with its chosen SAE and stores the codes of the selected
latents sparsely in scratch shards (one per batch; a killed run resumes at the
first missing shard). Passes 2-4 read the shards back, without the model, per
hook: running statistics (density, top/bottom-k, quantile), then the histogram
and the per-level samples (they need the maximum), then the segments. Outputs
(`latents/<hook>/stats.safetensors`, `segments.jsonl`, `meta.json`) are
described in docs/latents-format.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from safesail.config_types import CollectConfig, load_group
from safesail.errors import UserError
from safesail.hooks import HookPoint, capture_activations, special_token_mask
from safesail.interpret.latent_stats import LatentHistogram, RunningLatentStats
from safesail.interpret.segments import (LevelReservoir, SegmentSpec, deal_splits, level_of, segment_record,
                                         segment_span)
from safesail.interpret.records import write_latent_stats
from safesail.rundir import RunDir, atomic_write_json, atomic_write_text, fingerprint
from safesail.token_text import token_pieces

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Pass 4 holds the sampled segments of at most this many (latent, level, sample) rows at a time.
SEGMENT_CHUNK_ROWS = 200_000


@dataclass
class CollectSettings(CollectConfig):
    """collect.*: types in config_types.CollectConfig, defaults in configs/collect/default.yaml."""

    @classmethod
    def from_cfg(cls, c: DictConfig) -> "CollectSettings":
        s = load_group(c, cls, "collect")
        for name in ("k_top", "n_bins", "n_levels", "segment_len", "batch_size", "oversample"):
            if int(getattr(s, name)) < 1:
                raise UserError(f"collect.{name} is {getattr(s, name)}; set it to a positive integer.")
        if not 0.0 < float(s.quantile) < 1.0:
            raise UserError(f"collect.quantile is {s.quantile}; use a fraction between 0 and 1, e.g. 0.999.")
        return s

    @classmethod
    def defaults(cls, **changes) -> "CollectSettings":
        """configs/collect/default.yaml with `changes` applied (library callers and tests); `seed` follows
        the root config's run.seed."""
        from safesail.config import CONFIG_DIR

        root = OmegaConf.create({"run": OmegaConf.load(CONFIG_DIR / "config.yaml").run,
                                 "collect": OmegaConf.load(CONFIG_DIR / "collect" / "default.yaml")})
        return cls.from_cfg(OmegaConf.merge(root, {"collect": changes}).collect)

    def stats_key(self) -> dict:
        """The settings that shape the statistics and segments (the corpus keys are fingerprinted on their own)."""
        return {k: v for k, v in vars(self).items() if k not in _CORPUS_KEYS}


# collect.* keys that choose the corpus and the latents rather than how they are summarised
_CORPUS_KEYS = ("data", "ctx_len", "max_tokens", "latents")


@dataclass
class HookInputs:
    hook: str
    sae: torch.nn.Module
    latent_ids: list[int]
    out_dir: Path
    meta: dict = field(default_factory=dict)   # sae folder, model, which-latents mode, ...


# ---- pass 1: model + SAEs -> sparse codes in scratch shards ----------------------------------------

def _batches(windows: Iterable, size: int) -> Iterator[list]:
    batch = []
    for w in windows:
        batch.append(w)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safesail.atomic import atomic_save_safetensors

    atomic_save_safetensors(path, tensors)


def encode_shards(loaded, hooks: list[HookInputs], windows: Iterable, scratch: Path, batch_size: int,
                  total_windows: int | None = None) -> int:
    """Run pass 1; returns the number of shards. Existing shards are kept (resume)."""
    from safetensors.torch import load_file  # noqa: F401 - fail early if missing

    done_file = scratch / "encoded.json"
    if done_file.exists():
        return int(json.loads(done_file.read_text())["num_shards"])
    points = [HookPoint.parse(h.hook) for h in hooks]
    cols = {h.hook: torch.tensor(h.latent_ids, dtype=torch.long) for h in hooks}
    dev = loaded.device
    n = 0
    bar = tqdm(total=total_windows, desc="collect: encode windows", unit="win", leave=False)
    for i, batch in enumerate(_batches(windows, batch_size)):
        n = i + 1
        path = scratch / f"shard-{i:05d}.safetensors"
        bar.update(len(batch))
        if path.exists():
            continue
        ids = torch.tensor([w.input_ids for w in batch], dtype=torch.long)
        special = special_token_mask(loaded.tokenizer, ids)
        acts = capture_activations(loaded.model, ids.to(dev), None, points)
        out = {"window": torch.tensor([w.index for w in batch], dtype=torch.long), "input_ids": ids,
               "doc_ids": torch.tensor([w.doc_ids for w in batch], dtype=torch.long),
               "positions": torch.tensor([w.positions for w in batch], dtype=torch.long), "special": special}
        keep = ~special.reshape(-1)
        for h in hooks:
            x = acts[h.hook].reshape(-1, acts[h.hook].shape[-1]).float()
            with torch.no_grad():
                codes = h.sae.encode(x.to(next(h.sae.parameters()).device)).float().cpu()
            codes = codes[:, cols[h.hook]]
            codes[~keep] = 0
            row, col = torch.nonzero(codes > 0, as_tuple=True)
            out[f"{h.hook}.row"], out[f"{h.hook}.col"], out[f"{h.hook}.val"] = row, col, codes[row, col]
        _save(path, out)
    bar.close()
    if n == 0:
        raise UserError("the explanation corpus gave no window of tokens; add text or lower collect.ctx_len.")
    atomic_write_json(done_file, {"num_shards": n})
    return n


# ---- passes 2-4: per hook, from the shards ------------------------------------------------------------

def _shards(scratch: Path, n: int, desc: str) -> Iterator[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    for i in tqdm(range(n), desc=desc, unit="shard", leave=False):
        yield load_file(str(scratch / f"shard-{i:05d}.safetensors"))


def _dense(shard: dict, hook: str, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes of non-special tokens [n, m], their global token index [n], flat non-special mask)."""
    b, ctx = shard["input_ids"].shape
    dense = torch.zeros(b * ctx, m)
    dense[shard[f"{hook}.row"], shard[f"{hook}.col"]] = shard[f"{hook}.val"]
    gidx = (shard["window"].view(-1, 1) * ctx + torch.arange(ctx).view(1, -1)).reshape(-1)
    keep = ~shard["special"].reshape(-1)
    return dense[keep], gidx[keep], keep


def _random_pool(scratch: Path, n: int, size: int, seed: int) -> torch.Tensor:
    """Uniform sample (without replacement) of global indices of non-special tokens."""
    gen = torch.Generator().manual_seed(seed + 7)
    idx, prio = torch.empty(0, dtype=torch.long), torch.empty(0)
    for shard in _shards(scratch, n, "collect: random pool"):
        b, ctx = shard["input_ids"].shape
        gidx = (shard["window"].view(-1, 1) * ctx + torch.arange(ctx).view(1, -1)).reshape(-1)
        gidx = gidx[~shard["special"].reshape(-1)]
        idx = torch.cat([idx, gidx])
        prio = torch.cat([prio, torch.rand(len(gidx), generator=gen)])
        if len(idx) > size:
            keep = torch.topk(prio, size, largest=False).indices
            idx, prio = idx[keep], prio[keep]
    return idx[torch.argsort(prio)]


class _TokenText:
    """Token texts of a segment, decoded in context (no U+FFFD for split multi-byte characters)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, ids: list[int]) -> list[str]:
        return token_pieces(self.tok, list(ids))


def collect_hook(h: HookInputs, scratch: Path, n_shards: int, pool: torch.Tensor, s: CollectSettings,
                 tokenizer, meta_common: dict) -> dict:
    """Write stats.safetensors, segments.jsonl and meta.json of one hook; returns its summary."""
    hook, m = h.hook, len(h.latent_ids)
    # Pass 2: running statistics.
    stats = RunningLatentStats(m, s.k_top)
    for shard in _shards(scratch, n_shards, f"collect: stats {hook}"):
        codes, gidx, _ = _dense(shard, hook, m)
        stats.update(codes, gidx)
    tensors, exact = stats.finish(s.quantile)
    num_tokens = stats.num_tokens
    if not exact:
        log.warning("%s: the %.4f quantile's rank lies beyond the kept top-%d values; quantile_999 is the "
                    "%d-th largest activation (raise collect.k_top for an exact interpolation)", hook,
                    s.quantile, s.k_top, s.k_top)
    # Pass 3: histogram + per-level samples of centre tokens.
    hist = LatentHistogram(tensors["max_act"], s.n_bins)
    res_size = s.oversample * (s.explain_per_level + s.score_per_level)
    reservoir = LevelReservoir(m, s.n_levels, res_size, seed=s.seed)
    for shard in _shards(scratch, n_shards, f"collect: levels {hook}"):
        codes, gidx, _ = _dense(shard, hook, m)
        hist.update(codes)
        rows, cols = torch.nonzero(codes > 0, as_tuple=True)
        vals = codes[rows, cols]
        reservoir.update(cols, level_of(vals, tensors["max_act"][cols], s.n_levels), gidx[rows], vals)
    # Pass 4: spans and activations of the sampled segments, a chunk of latents at a time
    # (bounded memory when every latent of a wide SAE is collected).
    text = _TokenText(tokenizer)
    seg_path = h.out_dir / "segments.jsonl"
    tmp = seg_path.with_name(".segments.jsonl.tmp")
    too_few, few_random, seg_counts = [], [], {"explain": 0, "score": 0}
    chunk = max(1, SEGMENT_CHUNK_ROWS // (s.n_levels * res_size))
    lat_of_row = (reservoir.group // s.n_levels).tolist()
    pool_info: dict[int, dict] | None = None
    with open(tmp, "w", encoding="utf-8") as f:
        for c0 in range(0, m, chunk):
            centers: dict[int, list[int]] = {}  # global token -> reservoir rows of this chunk's latents
            for r, t in enumerate(reservoir.token.tolist()):
                if c0 <= lat_of_row[r] < c0 + chunk:
                    centers.setdefault(t, []).append(r)
            cand, pinfo = _extract(scratch, n_shards, hook, m, centers, lat_of_row,
                                   pool if pool_info is None else None, s, f"collect: segments {hook}")
            pool_info = pinfo if pool_info is None else pool_info
            for j in range(c0, min(m, c0 + chunk)):
                lat = h.latent_ids[j]
                chosen, rnd, data = _choose(j, lat, reservoir, cand, pool, pool_info, s)
                for sid, sp in enumerate(chosen + rnd):
                    d = data[id(sp)]
                    acts = d["acts"] if sp.kind == "activating" else [0.0] * len(d["token_ids"])
                    rec = segment_record(hook, lat, sid, sp, d["doc_id"], d["token_ids"], text(d["token_ids"]),
                                         acts)
                    rec["start"] = d["doc_pos"]
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    seg_counts[sp.split] += 1
                if int(stats.fire_count[j]) == 0:
                    too_few.append({"latent": lat, "reason": "never fires on the explanation corpus", "segments": 0})
                elif len(chosen) < s.min_examples:
                    too_few.append({"latent": lat, "segments": len(chosen),
                                    "reason": f"only {len(chosen)} non-overlapping activating segments "
                                              f"(fewer than collect.min_examples={s.min_examples})"})
                if len(rnd) < s.random_explain + s.random_score:
                    few_random.append(lat)
    tmp.replace(seg_path)
    tensors["latent_ids"] = torch.tensor(h.latent_ids, dtype=torch.int64)
    tensors["hist_counts"] = hist.counts
    tensors["hist_edges"] = hist.edges()
    if too_few:
        log.warning("%s: %d of %d latents have too few examples (listed in meta.json)", hook, len(too_few), m)
    hp = HookPoint.parse(hook)
    meta = {"format_version": FORMAT_VERSION, "hook": hook, "layer": hp.layer, "site": hp.site, **meta_common,
            **h.meta, "num_tokens": num_tokens, "num_latents": m, "k_top": s.k_top, "quantile": s.quantile,
            "quantile_exact": exact, "n_bins": s.n_bins, "n_levels": s.n_levels, "segment_len": s.segment_len,
            "segments": seg_counts, "dead_latents": int((stats.fire_count == 0).sum()),
            "too_few": too_few, "too_few_count": len(too_few), "few_random": few_random,
            "complete": True}
    write_latent_stats(h.out_dir, tensors, meta)  # stats first, meta.json last: meta means complete
    return {"latents": m, "too_few": len(too_few), **seg_counts}


def collect_latents(loaded, hooks: list[HookInputs], windows: Iterable, work_dir: Path, s: CollectSettings,
                    fp: str, meta_common: dict, total_windows: int | None = None) -> dict:
    """Pass 1 for every hook at once, then passes 2-4 per hook; resumable at every step."""
    scratch = work_dir / ".scratch"
    stamp = scratch / "fingerprint.txt"
    if scratch.exists() and (not stamp.exists() or stamp.read_text().strip() != fp):
        log.info("collect: settings changed since the last run; starting the scratch shards over")
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, fp)
    todo = [h for h in hooks if not _hook_done(h, fp)]
    summary = {}
    if todo:
        n = encode_shards(loaded, hooks, windows, scratch, s.batch_size, total_windows)
        pool = _random_pool(scratch, n, s.random_pool, s.seed)
        for h in todo:
            h.out_dir.mkdir(parents=True, exist_ok=True)
            summary[h.hook] = collect_hook(h, scratch, n, pool, s, loaded.tokenizer, {**meta_common, "fingerprint": fp})
            log.info("collect %s: %s", h.hook, summary[h.hook])
    if not s.keep_scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def _extract(scratch: Path, n_shards: int, hook: str, m: int, centers: dict[int, list[int]], lat_of_row: list[int],
             pool: torch.Tensor | None, s: CollectSettings, desc: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """Read the shards once: segment data per reservoir row in `centers`, and (when `pool` is given)
    the span of every random-pool centre with a per-latent "zero on the whole span" flag."""
    pool_set = {int(t): i for i, t in enumerate(pool.tolist())} if pool is not None else {}
    cand: dict[int, dict] = {}
    pool_info: dict[int, dict] = {}
    for shard in _shards(scratch, n_shards, desc):
        b, ctx = shard["input_ids"].shape
        dense = torch.zeros(b * ctx, m)
        dense[shard[f"{hook}.row"], shard[f"{hook}.col"]] = shard[f"{hook}.val"]
        dense = dense.view(b, ctx, m)
        for wi, w in enumerate(shard["window"].tolist()):
            lo, hi = w * ctx, (w + 1) * ctx
            hits = [t for t in range(lo, hi) if t in centers or t in pool_set]
            if not hits:
                continue
            doc_row = shard["doc_ids"][wi].tolist()
            for t in hits:
                col = t - lo
                a, z = segment_span(doc_row, col, s.segment_len, s.segment_left)
                seg = {"window": w, "start": a, "stop": z, "doc_id": doc_row[col],
                       "doc_pos": int(shard["positions"][wi, a]), "token_ids": shard["input_ids"][wi, a:z].tolist()}
                for r in centers.get(t, []):
                    cand[r] = {**seg, "acts": dense[wi, a:z, lat_of_row[r]].tolist()}
                if t in pool_set:
                    pool_info[pool_set[t]] = {**seg, "zero": dense[wi, a:z].amax(0) <= 0}
    return cand, pool_info


def _choose(j: int, lat: int, reservoir: LevelReservoir, cand: dict[int, dict], pool: torch.Tensor,
            pool_info: dict[int, dict], s: CollectSettings) -> tuple[list[SegmentSpec], list[SegmentSpec], dict]:
    """Latent j's accepted activating segments (highest level first) and random negatives, with their data."""
    specs, data = [], {}
    for lvl, tok, _act, _p, r in reservoir.items(j):
        d = cand.get(r)
        if d is None:
            continue
        sp = SegmentSpec(lat, "activating", lvl, d["window"], d["start"], d["stop"], tok)
        specs.append(sp)
        data[id(sp)] = d
    chosen: list[SegmentSpec] = []
    taken: dict[int, list[tuple[int, int]]] = {}
    for lvl in range(s.n_levels - 1, -1, -1):
        lv = [sp for sp in specs if sp.level == lvl]
        chosen.extend(deal_splits(lv, s.explain_per_level, s.score_per_level, taken))
    rnd_specs = []
    for pi in range(len(pool)):
        d = pool_info.get(pi)
        if d is None or not bool(d["zero"][j]):
            continue
        sp = SegmentSpec(lat, "random", None, d["window"], d["start"], d["stop"], int(pool[pi]))
        rnd_specs.append(sp)
        data[id(sp)] = d
    rnd = deal_splits(rnd_specs, s.random_explain, s.random_score, taken)
    return chosen, rnd, data


def _hook_done(h: HookInputs, fp: str) -> bool:
    p = h.out_dir / "meta.json"
    if not p.exists() or not (h.out_dir / "stats.safetensors").exists():
        return False
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError:
        return False
    return bool(meta.get("complete")) and meta.get("fingerprint") == fp


# ---- the stage -----------------------------------------------------------------------------------------

def resolve_latents(spec, rd: RunDir, hook: str, n_latents: int) -> tuple[str, list[int]]:
    """(mode, latent ids) from collect.latents: candidates | all | explicit list."""
    if spec is None or spec == "candidates":
        from safesail.train.selection import candidate_latents

        ids = candidate_latents(rd.root, hook)
        mode = "candidates"
    elif spec == "all":
        return "all", list(range(n_latents))
    elif OmegaConf.is_list(spec) or isinstance(spec, (list, tuple)):
        try:
            ids = [int(x) for x in spec]
        except (TypeError, ValueError):
            raise UserError(f"collect.latents holds a non-integer ({list(spec)}); give latent ids like [3, 17].") \
                from None
        mode = "list"
    else:
        raise UserError(f"collect.latents is {spec!r}; use candidates, all, or a list of latent ids like [3, 17].")
    bad = [j for j in ids if not 0 <= j < n_latents]
    if bad:
        raise UserError(f"latent {bad[0]} is out of range for the SAE at {hook} ({n_latents} latents); fix "
                        "collect.latents.")
    return mode, sorted(set(ids))


def corpus_cfg(cfg: DictConfig) -> DictConfig:
    """The explanation corpus: the `data` group with collect.data's keys (if any) on top."""
    base = OmegaConf.to_container(cfg.data, resolve=True)
    extra = cfg.collect.get("data")
    if extra:
        base.update(OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else dict(extra))
    return OmegaConf.create(base)


def _sae_cfg(sae) -> dict:
    c = getattr(sae, "cfg", None)
    if c is None:
        return {}
    if isinstance(c, dict):
        return c
    try:
        import dataclasses

        return dataclasses.asdict(c)
    except TypeError:
        return dict(vars(c))


def run_collect_stage(cfg: DictConfig, args: list[str]) -> None:
    from safesail.corpus import iter_documents, pack_windows
    from safesail.models import load_model
    from safesail.saes import load_sae
    from safesail.train.selection import chosen_sae_dirs

    if args:
        raise UserError(f"`safesail collect` takes no arguments (got {' '.join(args)}); pass settings as "
                        "collect.key=value.")
    rd = RunDir.from_cfg(cfg)
    rd.save_config(cfg)
    s = CollectSettings.from_cfg(cfg.collect)
    data_cfg = corpus_cfg(cfg)
    ctx_len = int(s.ctx_len or data_cfg.ctx_len)
    max_tokens = s.max_tokens
    sae_dirs = chosen_sae_dirs(cfg, rd.root)
    saes, plan = {}, {}
    for hook, folder in sorted(sae_dirs.items()):
        sae = load_sae(folder)
        sc = _sae_cfg(sae)
        n_lat = int(sc.get("n_latents") or sc.get("num_latents"))
        mode, ids = resolve_latents(s.latents, rd, hook, n_lat)
        saes[hook] = sae
        plan[hook] = {"sae": str(Path(folder).resolve().relative_to(rd.root.resolve())) if
                      Path(folder).resolve().is_relative_to(rd.root.resolve()) else str(folder),
                      "sae_cfg": sc, "mode": mode, "latents": ids}
    fp = fingerprint({"v": FORMAT_VERSION, "model": cfg.model.name, "data": OmegaConf.to_container(data_cfg),
                      "ctx_len": ctx_len, "max_tokens": max_tokens, "settings": s.stats_key(), "plan": plan})
    if rd.stage_done("collect", fp):
        log.info("collect: already done for these settings (%s); nothing to do", rd.root / "latents")
        return
    loaded = load_model(cfg.model, cfg.get("device", "auto"), cache_dir=cfg.get("cache_dir"))
    hooks = []
    for hook, p in plan.items():
        sc = p["sae_cfg"]
        if sc.get("d_in") and int(sc["d_in"]) != loaded.hidden_size:
            raise UserError(f"the SAE at {hook} reads {sc['d_in']}-dim activations but {loaded.name} has "
                            f"{loaded.hidden_size}; train SAEs for this model or fix model=.")
        if sc.get("hook") and str(sc["hook"]) != hook:
            raise UserError(f"the SAE chosen for {hook} was trained on {sc['hook']}; run `safesail select` again.")
        if sc.get("model") and str(sc["model"]) != loaded.name:
            raise UserError(f"the SAE at {hook} was trained on model {sc['model']}, not {loaded.name}; use the "
                            "same model= as the training run.")
        saes[hook].to(loaded.device).eval()
        hooks.append(HookInputs(hook, saes[hook], p["latents"], rd.latents(hook),
                                {"sae": p["sae"], "sae_arch": sc.get("arch"), "sae_k": sc.get("k"),
                                 "n_latents_sae": sc.get("n_latents"), "which_latents": p["mode"]}))
    windows = pack_windows(iter_documents(data_cfg, loaded.tokenizer, cfg.model.get("system_prompt")),
                           loaded.tokenizer, ctx_len, max_tokens)
    total = int(max_tokens) // ctx_len if max_tokens else None
    meta_common = {"model": loaded.name, "corpus": data_cfg.get("hub") or list(data_cfg.get("paths") or []),
                   "ctx_len": ctx_len}
    summary = collect_latents(loaded, hooks, windows, rd.root / "latents", s, fp, meta_common, total)
    rd.mark_stage("collect", fp, hooks=summary)
