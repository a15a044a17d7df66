"""`safesail train`: train the SAE sweep on the activation cache, evaluate it, write the sweep table.

A thin layer over `safesail.train.trainer.train_saes`:
1. plan: every entry of the sweep (configs/sae/*.yaml) on every hook, width from the cache;
2. skip SAEs already trained with the same settings; refuse (one sentence) folders trained
   with other settings unless `train.overwrite=true`;
3. train the rest in one pass over the caches (all hooks zipped batch by batch), checkpointing
   to `saes/.train/<job>.pt` every `train.checkpoint_every` batches (a killed run resumes there);
4. save each SAE to `saes/<hook>/<name>/`, then evaluate it on the held-out split and write
   metrics.json; write `saes/sweep.json` + `saes/sweep.png` and print the table.

Launch on several processes with `torchrun --nproc_per_node N -m safesail train ...` or
`accelerate launch -m safesail train ...` (train.distributed=ddp | sae_parallel).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from safesail.errors import UserError
from safesail.rundir import RunDir, fingerprint
from safesail.saes import SAEConfig, load_sae, read_cfg, read_metrics, save_sae
from safesail.train.activation_store import ActivationStore
from safesail.train.distributed import DistContext
from safesail.train.optim import resolve_optimizer
from safesail.train.sweep import (
    format_table,
    make_configs,
    sweep_entries,
    sweep_hooks,
    write_sweep,
)
from safesail.train.trainer import TrainOptions, train_saes

log = logging.getLogger(__name__)

_TRAIN_KEYS = ("batch_size", "epochs", "max_tokens", "lr_warmup_steps", "lr_decay_fraction", "adam_betas",
               "adam_eps", "dead_tokens", "autocast", "decoder_impl", "shuffle_seed")
_EVAL_KEYS = ("tokens", "ce_tokens", "ce_batch_size", "batch_size")
# recipe keys fingerprinted only away from these defaults, so runs made before the keys existed stay valid
_RECIPE_DEFAULTS = {"resample_every": 0, "split_every": 0, "split_cos": 0.9, "resample_until": 0.5,
                    "warm_k": 0, "warm_until": 0.3}


def _recipe(tc) -> dict:
    """The resampling / duplicate-split / warm-phase keys of `train` (checked), for TrainOptions."""
    r = {k: type(d)(tc.get(k, d)) for k, d in _RECIPE_DEFAULTS.items()}
    if r["warm_k"] < 0:
        raise UserError(f"train.warm_k is {r['warm_k']}; set it to 0 (off) or the latents a token takes while warm.")
    for k in ("resample_every", "split_every"):
        if r[k] < 0:
            raise UserError(f"train.{k} is {r[k]}; set it to 0 (never) or a positive number of steps.")
    for k in ("split_cos", "resample_until", "warm_until"):
        if not 0 < r[k] <= 1:
            raise UserError(f"train.{k} is {r[k]}; use a value in (0, 1].")
    return r


def _open_stores(rd: RunDir, hooks: list[str], model_name: str) -> dict[str, ActivationStore]:
    stores = {}
    for hook in hooks:
        store = ActivationStore(rd.activations(hook))
        cached = store.meta.get("model")
        if cached and cached != model_name:
            raise UserError(f"the activation cache of {hook} is of model {cached!r}, not {model_name!r}; re-run "
                            "`safesail cache` for this model or pick the matching model=... config.")
        if store.hook != hook:
            raise UserError(f"the activation cache in {store.folder} holds hook {store.hook}, not {hook}; re-run "
                            "`safesail cache`.")
        stores[hook] = store
    return stores


def _status(folder: Path, train_fp: str, eval_fp: str) -> str:
    """todo | conflict | trained (needs evaluation) | done."""
    if not (folder / "cfg.json").is_file():
        return "todo"
    if read_cfg(folder).extra.get("fingerprint") != train_fp:
        return "conflict"
    m = read_metrics(folder) or {}
    return "done" if m.get("evaluated") and m.get("eval_fingerprint") == eval_fp else "trained"


def run_train_stage(cfg: DictConfig, args: list[str]) -> None:
    from safesail.models.loading import resolve_device

    tc = cfg.train
    if args:
        log.warning("ignoring arguments %s (the train stage takes only key=value overrides)", args)
    device = resolve_device(tc.get("device") or cfg.get("device", "auto"))
    ctx = DistContext.from_env(str(tc.get("distributed", "ddp")), device)
    device = ctx.device if ctx.world_size > 1 else device
    rd = RunDir.from_cfg(cfg)
    if ctx.is_main:
        rd.save_config(cfg)

    hooks = sweep_hooks(cfg)
    entries = sweep_entries(cfg.sae)
    model_name = str(cfg.model.name)
    stores = _open_stores(rd, hooks, model_name)
    train_bits = {k: OmegaConf.to_container(tc, resolve=True).get(k) for k in _TRAIN_KEYS}
    train_bits.update({k: v for k, v in _recipe(tc).items() if v != _RECIPE_DEFAULTS[k]})
    eval_fp = fingerprint({k: OmegaConf.to_container(tc.eval, resolve=True).get(k) for k in _EVAL_KEYS})

    plan: list[tuple[SAEConfig, str, Path]] = []  # (config, train fingerprint, folder)
    steps = _planned_steps(tc, stores, hooks, ctx)
    for hook in hooks:
        store = stores[hook]
        for c in make_configs(entries, hook, store.d, model_name, cfg):
            c.optimizer = resolve_optimizer(c.optimizer, steps)   # auto: by run length, before the fingerprint
            fp = fingerprint({"sae": c.to_dict(), "train": train_bits, "data": store.meta.get("fingerprint")})
            c.extra["fingerprint"] = fp
            plan.append((c, fp, rd.saes(hook) / c.name))
    stage_fp = fingerprint({"saes": [fp for _, fp, _ in plan], "eval": eval_fp})
    if rd.stage_done("train", stage_fp) and all(_status(f, fp, eval_fp) == "done" for _, fp, f in plan):
        log.info("train: all %d SAEs are already trained and evaluated; nothing to do", len(plan))
        rows, _, _ = write_sweep(rd.saes(), plot=False) if ctx.is_main else ([], None, None)
        if ctx.is_main:
            print(format_table([r for r in rows if any(r["folder"] == str(f.relative_to(rd.saes()))
                                                       for _, _, f in plan)]))
        return

    overwrite = bool(tc.get("overwrite", False))
    status = {f: _status(f, fp, eval_fp) for _, fp, f in plan}
    conflicts = [f for f, s in status.items() if s == "conflict"]
    if conflicts and not overwrite:
        raise UserError(f"{conflicts[0]} holds an SAE trained with other settings; pass train.overwrite=true to "
                        "replace it, or pick another run.name=... to keep it.")
    todo = [(c, fp, f) for c, fp, f in plan if status[f] in ("todo", "conflict")]
    job_id = fingerprint(sorted(str(f) for _, _, f in plan))
    ck_path = rd.saes() / ".train" / f"{job_id}.pt"
    if overwrite and ck_path.exists() and ctx.is_main:
        ck_path.unlink()
    if todo:
        _train(cfg, ctx, device, rd, stores, todo, plan, ck_path)
    if not ctx.is_main:
        return
    _evaluate(cfg, device, rd, stores, [(c, f) for c, fp, f in plan if _status(f, fp, eval_fp) != "done"], eval_fp)
    rows, json_path, png = write_sweep(rd.saes(), plot=bool(tc.get("plot", True)))
    mine = {str(f.relative_to(rd.saes())) for _, _, f in plan}
    print(format_table([r for r in rows if r["folder"] in mine]))
    log.info("sweep table: %s%s", json_path, f", plot: {png}" if png else "")
    rd.mark_stage("train", stage_fp, saes=len(plan), sweep=str(json_path))


def _step_counts(tc, stores: dict[str, ActivationStore], hooks: list[str], w: int) -> tuple[int, int]:
    """(steps per epoch, total optimiser steps) of a run over `hooks` on `w` data-parallel processes
    (0 when a cache is short of one batch)."""
    batch_size = int(tc.batch_size)
    steps_per_epoch = min(stores[h].num_batches(max(1, batch_size // w)) for h in hooks) // w
    total = steps_per_epoch * int(tc.get("epochs", 1))
    if tc.get("max_tokens"):
        total = min(total, max(1, int(tc.max_tokens) // batch_size))
    return steps_per_epoch, total


def _planned_steps(tc, stores: dict[str, ActivationStore], hooks: list[str], ctx: DistContext) -> int:
    """Optimiser steps the run will take, counted as `_train` counts them."""
    return _step_counts(tc, stores, hooks, ctx.world_size if ctx.world_size > 1 and ctx.mode == "ddp" else 1)[1]


def _train(cfg, ctx: DistContext, device: torch.device, rd: RunDir, stores: dict[str, ActivationStore],
           todo: list, plan: list, ck_path: Path) -> None:
    tc = cfg.train
    hooks = sorted({c.hook for c, _, _ in todo})
    batch_size = int(tc.batch_size)
    ddp = ctx.world_size > 1 and ctx.mode == "ddp"
    w = ctx.world_size if ddp else 1
    if batch_size % w:
        raise UserError(f"train.batch_size={batch_size} does not split evenly over {w} processes; pick a multiple of {w}.")
    per_rank = batch_size // w
    for h in hooks:
        have = stores[h].split_tokens("train")
        if have < batch_size:
            raise UserError(f"the activation cache of {h} holds {have} training tokens, fewer than one batch "
                            f"(train.batch_size={batch_size}); cache more data or lower train.batch_size.")
    steps_per_epoch, total = _step_counts(tc, stores, hooks, w)
    epochs = int(tc.get("epochs", 1))
    seed = int(tc.get("shuffle_seed", 0))
    rank = ctx.rank if ddp else 0

    def batches(start_step: int) -> Iterator[dict[str, torch.Tensor]]:
        step = start_step
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            its = {h: stores[h].iter_batches(per_rank, seed=seed + epoch, start_batch=offset * w, rank=rank,
                                             world_size=w) for h in hooks}
            for _ in range(offset, steps_per_epoch):
                if step >= total:
                    return
                yield {h: next(its[h]) for h in hooks}
                step += 1

    all_fps = [fp for _, fp, _ in plan]
    opts = TrainOptions(
        total_steps=total, max_steps=total, lr_warmup_steps=min(int(tc.lr_warmup_steps), max(1, total // 10)),
        lr_decay_fraction=float(tc.lr_decay_fraction), adam_betas=tuple(tc.adam_betas), adam_eps=float(tc.adam_eps),
        dead_tokens=int(tc.dead_tokens) if tc.get("dead_tokens") else None, autocast=tc.autocast, decoder_impl=str(tc.decoder_impl), device=str(device),
        checkpoint_path=ck_path, checkpoint_every=int(tc.checkpoint_every), **_recipe(tc),
        fingerprint=fingerprint({"plan": all_fps, "world": [ctx.world_size, ctx.mode]}),
        log_every=int(tc.get("log_every", 20)), distributed=ctx.mode, sae_threads=int(tc.get("sae_threads") or 1),
        wandb={**OmegaConf.to_container(cfg.wandb, resolve=True), "name": f"{cfg.run.name}-train",
               "dir": str(rd.root)})
    n_tokens = total * batch_size
    log.info("training %d SAE(s) on %s: %d steps of %d tokens (%d epoch(s)), device %s, %d process(es)",
             len(todo), ", ".join(hooks), total, batch_size, epochs, device, ctx.world_size)
    t0 = time.perf_counter()
    trained = train_saes(batches, [c for c, _, _ in todo], opts, ctx=ctx)
    dt = time.perf_counter() - t0
    log.info("trained in %.1f s: %.0f tokens/s per SAE", dt, n_tokens / max(dt, 1e-9))
    folders = {(c.hook, c.name): f for c, _, f in todo}
    if ctx.is_main or ctx.mode == "sae_parallel":
        for t in trained:
            folder = folders[(t.cfg.hook, t.cfg.name)]
            if folder.exists():
                shutil.rmtree(folder)  # only reached for an SAE we were told to overwrite, or a partial folder
            save_sae(t.sae, folder, metrics={**t.metrics, "evaluated": False, "train_seconds": dt})
    ctx.barrier()
    if ctx.is_main:
        for p in ck_path.parent.glob(f"{ck_path.stem}*{ck_path.suffix}"):
            p.unlink()


def _same_windows(stores: list[ActivationStore]) -> bool:
    """True when the caches hold the same token windows (one `safesail cache` run over several hooks)."""
    keys = ("data_fingerprint", "num_windows", "ctx_len", "eval_every", "model")
    return len({tuple(str(s.meta.get(k)) for k in keys) for s in stores}) == 1


def _evaluate(cfg, device: torch.device, rd: RunDir, stores: dict[str, ActivationStore], pending: list,
              eval_fp: str) -> None:
    from safesail.rundir import atomic_write_json
    from safesail.train.evaluate import evaluate_ce_hooks, evaluate_reconstruction

    if not pending:
        return
    ec = cfg.train.eval
    by_hook: dict[str, list[tuple[SAEConfig, Path]]] = {}
    for c, f in pending:
        by_hook.setdefault(c.hook, []).append((c, f))
    saes = {hook: [load_sae(f, device) for _, f in items] for hook, items in by_hook.items()}
    rec: dict[str, list[dict]] = {}
    for hook in by_hook:
        store = stores[hook]
        rec[hook] = evaluate_reconstruction(
            saes[hook], store.iter_batches(int(ec.batch_size), shuffle=False, split="eval", drop_last=False),
            device, max_tokens=int(ec.tokens) if ec.get("tokens") else None)
        if rec[hook] and rec[hook][0]["eval_tokens"] == 0:
            log.warning("the activation cache of %s has no held-out tokens; FVU/L0 are not measured", hook)
    ce: dict[str, list[dict]] = {hook: [{} for _ in saes[hook]] for hook in by_hook}
    if int(ec.get("ce_tokens") or 0) > 0:
        from safesail.models import load_model

        loaded = load_model(cfg.model, device, cache_dir=cfg.get("cache_dir"))
        hooks = list(by_hook)
        # one clean forward per window for every hook when the caches share their windows
        groups = [hooks] if _same_windows([stores[h] for h in hooks]) else [[h] for h in hooks]
        for group in groups:
            ce.update(evaluate_ce_hooks(loaded.model, loaded.tokenizer, {h: saes[h] for h in group},
                                        stores[group[0]].iter_token_windows("eval"),
                                        batch_size=int(ec.ce_batch_size), max_tokens=int(ec.ce_tokens)))
        del loaded
    for hook, items in by_hook.items():
        for (c, f), r, e in zip(items, rec[hook], ce[hook]):
            m = read_metrics(f) or {}
            m.update(r)
            m.update(e)
            m.update(evaluated=True, eval_fingerprint=eval_fp, fingerprint=c.extra.get("fingerprint"),
                     config=read_cfg(f).to_dict())
            atomic_write_json(f / "metrics.json", m)
            log.info("%s/%s: fvu %.4f l0 %.1f dead %.3f ce_recovered %s +- %s ce_increase %s +- %s nats", hook, c.name,
                     r["fvu"], r["l0"], r["dead_fraction"], e.get("ce_loss_recovered"), e.get("ce_loss_recovered_se"),
                     e.get("ce_loss_increase"), e.get("ce_loss_increase_se"))
