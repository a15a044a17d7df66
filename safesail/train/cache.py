"""The `cache` stage: run the source model over the corpus and store hook-point activations.

For each hook point it writes `runs/<name>/activations/<hook>/` (format:
docs/activation-cache.md). The corpus is packed into windows of `data.ctx_len`
tokens; process `rank` of `world_size` takes windows i % world_size == rank, so
`torchrun --nproc_per_node N -m safesail cache` gives the same tokens as one
process. A killed run continues where it stopped (see cache_shards.py).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safesail.errors import UserError
from safesail.rundir import RunDir, fingerprint
from safesail.train import cache_shards as shards

log = logging.getLogger(__name__)

STAGE = "cache"
STORE_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def store_dtype(name: str) -> torch.dtype:
    try:
        return STORE_DTYPES[str(name)]
    except KeyError:
        raise UserError(f"cache.dtype={name!r} is unknown; use bfloat16, float16 or float32.") from None


def corpus_fingerprint(data_cfg) -> str:
    """Names, sizes and contents of the corpus files (the first and last MiB of big ones)."""
    from safesail.corpus import list_sources

    if data_cfg.get("hub"):
        return fingerprint({"hub": data_cfg.hub, "config": data_cfg.get("hub_config"), "split": data_cfg.get("split")})
    h = hashlib.sha256()
    for src in list_sources(data_cfg.get("paths") or []):
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
        for p in files:
            size = p.stat().st_size
            h.update(f"{p.name}:{size}:".encode())
            with open(p, "rb") as f:
                if size <= 64 << 20:
                    h.update(f.read())
                else:
                    h.update(f.read(1 << 20))
                    f.seek(-(1 << 20), 2)
                    h.update(f.read())
    return h.hexdigest()[:16]


def stage_fingerprint(cfg: DictConfig, corpus_fp: str | None = None) -> str:
    """What decides the cache's contents (not batch size or device)."""
    c = cfg.get("cache") or {}
    parts = {"model": OmegaConf.to_container(cfg.model, resolve=True),
             "data": OmegaConf.to_container(cfg.data, resolve=True),
             "corpus": corpus_fp or corpus_fingerprint(cfg.data),
             "dtype": str(c.get("dtype", "bfloat16")), "eval_every": int(c.get("eval_every", 20))}
    if OmegaConf.select(cfg, "sae.hooks", default=None):  # a subset of hooks (model.layers alone: as before)
        from safesail.hooks import configured_hooks

        parts["hooks"] = [hp.name for hp in configured_hooks(cfg)]
    return fingerprint(parts)


def _distributed(device_name: str):
    """(rank, world_size, barrier, device) from accelerate; gloo on CPU."""
    from accelerate import PartialState

    from safesail.models import resolve_device

    dev = resolve_device(device_name)
    state = PartialState(cpu=dev.type == "cpu")
    if dev.type == "cuda" and state.num_processes > 1:
        dev = torch.device("cuda", state.local_process_index)
    return state.process_index, state.num_processes, state.wait_for_everyone, dev


def run_cache_stage(cfg: DictConfig, args: list[str]) -> None:
    if args:
        raise UserError(f"`safesail cache` takes no arguments besides key=value overrides, got {args[0]!r}.")
    rank, world, barrier, device = _distributed(str(cfg.get("device", "auto")))
    rd = RunDir.from_cfg(cfg, create=rank == 0)
    c = cfg.get("cache") or {}
    dtype = store_dtype(c.get("dtype", "bfloat16"))
    batch_size = int(c.get("batch_size", 8))
    eval_every = int(c.get("eval_every", 20))
    if eval_every < 2:
        raise UserError(f"cache.eval_every={eval_every}; use 2 or more (every n-th window is held out for eval).")
    corpus_fp = corpus_fingerprint(cfg.data)
    fp = stage_fingerprint(cfg, corpus_fp)
    if rd.stage_done(STAGE, fp):
        hooks = (rd.stage_record(STAGE).get("summary") or {}).get("hooks") or []
        if all(shards.cache_intact(rd.activations(h)) for h in hooks):
            log.info("cache: already done for this config in %s; nothing to do", rd.root)
            return
        log.warning("cache: finished before, but a shard is missing or damaged; checking and recomputing")

    from safesail.corpus import iter_documents, pack_windows
    from safesail.hooks import capture_activations, configured_hooks, special_token_mask
    from safesail.models import load_model

    lm = load_model(cfg.model, device, cache_dir=cfg.get("cache_dir"))
    points = configured_hooks(cfg, lm.num_layers)
    ctx_len = int(cfg.data.ctx_len)
    if ctx_len > int(cfg.model.get("max_length") or ctx_len):
        raise UserError(f"data.ctx_len={ctx_len} exceeds model.max_length={cfg.model.max_length}; lower data.ctx_len.")
    base = {"model": lm.name, "model_id": Path(lm.path).name if Path(lm.path).exists() else lm.path,
            "d": lm.hidden_size, "ctx_len": ctx_len, "dtype": str(dtype).removeprefix("torch."),
            "eval_every": eval_every, "data_fingerprint": fingerprint({"data": OmegaConf.to_container(cfg.data, resolve=True),
                                                                     "corpus": corpus_fp,
                                                                     "system_prompt": cfg.model.get("system_prompt")})}
    docs = iter_documents(cfg.data, lm.tokenizer, cfg.model.get("system_prompt"))
    windows = pack_windows(docs, lm.tokenizer, ctx_len, cfg.data.get("max_tokens"))
    first = next(windows, None)
    if first is None:
        raise UserError(f"the corpus has fewer tokens than one window of data.ctx_len={ctx_len}; add text or lower "
                        "data.ctx_len.")
    identities = {hp.name: {**base, "hook": hp.name} for hp in points}
    folders = {hp.name: rd.activations(hp.name) for hp in points}
    existing = {h: shards.check_existing(folders[h], identities[h]) for h in folders}

    barrier()
    extra = {"model_path": lm.path, "layer": None, "site": None, "fingerprint": fp,
             "special_token_ids": sorted(int(i) for i in set(lm.tokenizer.all_special_ids)),
             "vocab_size": len(lm.tokenizer), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if rank == 0:
        rd.save_config(cfg)
        for hp in points:
            if existing[hp.name] is None:
                shards.start_meta(folders[hp.name], identities[hp.name],
                                  {**extra, "layer": hp.layer, "site": hp.site})
            else:
                for bad in shards.drop_bad_shards(folders[hp.name]):
                    log.warning("cache: shard %s of %s; recomputing it", bad, hp.name)
    barrier()
    done: dict[str, set[int]] = {}
    for h, folder in folders.items():
        shards.repair_progress(folder, rank)
        done[h] = {w for rec in shards.read_progress(folder) for w in rec["windows"]}
    if any(done.values()):
        log.info("cache: resuming; %d windows already stored", min(len(s) for s in done.values()))

    n_windows = _cache_windows(lm, points, folders, done, _chain(first, windows), rank, world, batch_size,
                               dtype, capture_activations, special_token_mask)
    barrier()
    if rank == 0:
        summary = {}
        for hp in points:
            meta = shards.finalize(folders[hp.name], n_windows, {"layer": hp.layer, "site": hp.site})
            summary[hp.name] = meta["num_tokens"]
        rd.mark_stage(STAGE, fp, tokens=next(iter(summary.values())), hooks=list(summary))
        log.info("cache: %d tokens per hook point in %s", next(iter(summary.values())), rd.root / "activations")
    barrier()


def _chain(first, rest):
    yield first
    yield from rest


def _cache_windows(lm, points, folders, done, windows, rank, world, batch_size, dtype,
                   capture_activations, special_token_mask) -> int:
    """Forward this rank's missing windows in batches and hand the activations to the writer; returns #windows."""
    writer = shards.ShardWriter(rank)
    bar = tqdm(desc=f"cache (rank {rank})" if world > 1 else "cache", unit="tok", unit_scale=True,
               dynamic_ncols=True, mininterval=1.0)
    batch = []
    n = 0

    def flush():
        ids = torch.tensor([w.input_ids for w in batch], dtype=torch.long)
        acts = capture_activations(lm.model, ids.to(lm.device), None, points,
                                   transform=lambda hp, a: a.to(dtype=dtype).to("cpu"))
        special = special_token_mask(lm.tokenizer, ids)
        doc_ids = torch.tensor([w.doc_ids for w in batch], dtype=torch.int32)
        positions = torch.tensor([w.positions for w in batch], dtype=torch.int32)
        idx = [w.index for w in batch]
        for hp in points:
            keep = [j for j, w in enumerate(idx) if w not in done[hp.name]]
            if not keep:
                continue
            sel = torch.tensor(keep)
            writer.put(folders[hp.name], [idx[j] for j in keep], {
                "activations": acts[hp.name][sel].reshape(-1, lm.hidden_size),
                "tokens": ids[sel].reshape(-1).to(torch.int32),
                "doc_ids": doc_ids[sel].reshape(-1), "positions": positions[sel].reshape(-1),
                "special": special[sel].reshape(-1),
                "windows": torch.tensor([idx[j] for j in keep], dtype=torch.int64)}, hp.name)
        bar.update(ids.numel())
        batch.clear()

    try:
        for w in windows:
            n += 1
            if w.index % world != rank or all(w.index in d for d in done.values()):
                continue
            batch.append(w)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        bar.close()
        writer.close()
    return n
