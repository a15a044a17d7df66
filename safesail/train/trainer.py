"""Train one or many SAEs in a single pass over activation batches.

```python
from safesail.train.trainer import train_saes, TrainOptions
trained = train_saes(batches, [{"arch": "topk", "k": 32, "n_latents": 4096},
                               {"arch": "batchtopk", "k": 32, "n_latents": 4096}],
                     TrainOptions(lr_warmup_steps=100, total_steps=1000))
trained[0].sae.encode(x)     # an SAE in raw activation units; trained[0].metrics: training figures
```

`batches` is any iterable of `[batch, d]` tensors (every config then trains on them), or of
`{hook: tensor}` dicts (a config trains on the entry named by its `hook`), or a function
`start_batch -> iterable` (lets a resumed run skip data without reading it). Each batch is
read, checked, normalised and copied to the device once and fed to every SAE (on
`sae_threads` threads if asked); each SAE has its own optimiser (`cfg.optimizer`: schedule-free
signum, Adam with warmup / constant / final linear decay, or `auto`: signum below
`optim.AUTO_ADAM_STEPS` steps, Adam from there on) and learning rate
(`safesail.saes.config.default_lr`). The recipe and the sweep that chose it: docs/training.md.

Per SAE and step: activations scaled to unit mean squared norm (the scale is estimated on the
first batch and folded into the weights at the end), b_dec at the first batch's mean, the
loss (FVU + sparsity + AuxK on latents silent for `dead_tokens`, auto-sized to the run),
gradient parallel to decoder rows removed, optimiser step, decoder rows renormalised.
metrics hold the training figures and the learned-nothing signals (safesail/train/signals.py).

Resume: with `checkpoint_path`, the full state (weights, Adam moments, step, dead counters,
scales, RNG, data position) is written atomically every `checkpoint_every` batches and at
the end; a new call with the same fingerprint continues from it exactly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from safesail.errors import UserError
from safesail.rundir import fingerprint as make_fingerprint
from safesail.train.distributed import DistContext
from safesail.atomic import atomic_torch_save
from safesail.train.checkpoint import checkpoint_position, read_checkpoint  # noqa: F401 (re-exported)
from safesail.train.data_init import data_initial_decoder, init_decoder_from_data
from safesail.train.optim import make_optimizer, resolve_optimizer
from safesail.train.resample import resample_dead
from safesail.train.split import coherence_penalty, duplicate_pairs, split_duplicates, split_mixtures
from safesail.train.step_pool import StepPool
from safesail.train.wandb_log import start_wandb
from safesail.train.signals import curve_signals, weight_signals
from safesail.saes import SAE, SAEConfig, build_sae

log = logging.getLogger(__name__)

Batch = torch.Tensor | dict[str, torch.Tensor]
BatchSource = Iterable[Batch] | Callable[[int], Iterable[Batch]]


@dataclass
class TrainOptions:
    total_steps: int | None = None        # for the decay schedule (None: len(batches) if known, else no decay)
    max_steps: int | None = None          # stop after this many batches
    lr_warmup_steps: int = 100            # capped at 10% of total_steps when that is known
    lr_decay_fraction: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    dead_tokens: int | None = None        # a latent silent for this many tokens counts as dead (AuxK);
                                          # None: auto_dead_tokens(total tokens, batch)
    autocast: str | bool = "auto"         # auto: bf16 on CUDA when supported; true / false
    decoder_impl: str = "auto"            # TopK decoder: auto | sparse | dense
    device: str = "cpu"
    checkpoint_path: str | Path | None = None
    checkpoint_every: int = 0             # batches between checkpoints (0: only at the end)
    fingerprint: str | None = None        # identity of this training job (default: from configs + options)
    log_every: int = 20
    progress: bool = True
    wandb: dict[str, Any] | None = None   # {"mode": offline|online|disabled, "project": ..., "entity": ..., "name": ...}
    distributed: str = "ddp"              # ddp | sae_parallel (see safesail/train/distributed.py)
    sae_threads: int = 1                  # SAEs of a batch stepped concurrently (CPU: each gets
                                          # torch threads / sae_threads intra-op threads)
    resample_every: int = 0               # steps between dead-latent resamplings (0: never; safesail/train/resample.py)
    resample_until: float = 0.5           # ... only in this first share of the run (total_steps needed)
    split_every: int = 0                  # steps between duplicate splits (0: never; safesail/train/split.py),
                                          # until resample_until of the run
    split_cos: float = 0.9                # decoder cosine at which two latents count as duplicates
    mix_split_every: int = 0              # steps between mixture splits (0: never; split.split_mixtures), until
                                          # resample_until: dead and duplicate latents take half of a mixture latent
    mix_split_above: float = 0.3          # ... latents whose mixture score (split.mixture_scores) is above this are split
    coherence_coef: float = 0.0           # weight of split.coherence_penalty in the loss (0: off)
    coherence_cos: float = 0.8            # ... which penalises decoder cosines above this
    warm_k: int = 0                       # > 0: for the first warm_until of the run a pursuit SAE takes exactly warm_k
                                          # latents a token (its stop off), then its own k and stop (planted recipe)
    warm_until: float = 0.3


@dataclass
class TrainedSAE:
    sae: SAE                              # folded to raw units, eval mode, on CPU
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> SAEConfig:
        return self.sae.cfg

    @property
    def name(self) -> str:
        return self.sae.cfg.name


class SAETrainState:
    """One SAE with its optimiser, schedule and dead-latent counters."""

    def __init__(self, cfg: SAEConfig, opts: TrainOptions, device: torch.device):
        self.cfg = cfg
        self.opts = opts
        self.sae = build_sae(cfg, device=device)
        self.sae.decoder_impl = opts.decoder_impl
        self.base_lr = cfg.learning_rate
        self.opt = make_optimizer(cfg.optimizer, self.sae.parameters(), lr=self.base_lr,
                                  betas=tuple(opts.adam_betas), eps=opts.adam_eps)
        self.step = 0
        self.tokens = 0
        self.stale = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
        self.recent: dict[str, float] = {}
        self.curve: list[list[float]] = []    # [step, fvu moving average], about 20 points
        self.dead_tokens: int | None = opts.dead_tokens
        self.step_seconds = 0.0
        self.resampled = 0
        self.split = 0
        self._final_sparsity = None
        if opts.warm_k:
            if cfg.arch != "pursuit":
                raise UserError(f"warm_k needs a pursuit SAE (got {cfg.arch}); set warm_k: 0.")
            if not (isinstance(opts.warm_k, int) and 1 <= opts.warm_k <= cfg.k and 0.0 < float(opts.warm_until) <= 1.0):
                raise UserError(f"warm_k must be an integer from 1 to k={cfg.k} and warm_until in (0, 1] "
                                f"(got {opts.warm_k!r}, {opts.warm_until!r}).")
            p = self.sae.cfg.params
            self._final_sparsity = {"k": p["k"], "rounds": p["rounds"], "stop": p.get("stop", 0.0)}

    def lr_at(self, step: int) -> float:
        base = self.base_lr
        warm = self.opts.lr_warmup_steps
        if self.opts.total_steps:
            warm = min(warm, max(1, self.opts.total_steps // 10))
        factor = min(1.0, (step + 1) / max(1, warm))
        total = self.opts.total_steps
        if total and self.opts.lr_decay_fraction > 0 and self.cfg.optimizer != "signum":  # schedule-free: no decay
            decay_start = total * (1 - self.opts.lr_decay_fraction)
            if step >= decay_start:
                factor *= max(0.0, (total - step) / (total - decay_start))
        return base * factor

    def train_step(self, x: torch.Tensor, stats: tuple[torch.Tensor, int], ctx: DistContext,
                   autocast_ctx: Callable[[], Any]) -> dict[str, float]:
        if self._final_sparsity is None:
            return self._train_step(x, stats, ctx, autocast_ctx)
        try:
            return self._train_step(x, stats, ctx, autocast_ctx)
        finally:   # warm_k: the warm sparsity lives only inside a step, so that between steps the SAE's config,
            # folder name and checkpoint key are its own (a checkpoint written in the warm phase resumes)
            self.sae.cfg.params.update(self._final_sparsity)

    def _train_step(self, x: torch.Tensor, stats: tuple[torch.Tensor, int], ctx: DistContext,
                    autocast_ctx: Callable[[], Any]) -> dict[str, float]:
        total_var, n_global = stats
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        if self.dead_tokens is None:
            self.dead_tokens = auto_dead_tokens(self.opts.dead_tokens, self.opts.total_steps, n_global)
        dead = self.stale >= self.dead_tokens
        if self._final_sparsity is not None:
            self._set_sparsity()
        self.opt.zero_grad(set_to_none=True)
        with autocast_ctx():
            out = self.sae.forward_with_loss(x, dead_mask=dead, total_var=total_var, n_tokens=n_global)
        loss = out.loss
        if self.opts.coherence_coef:
            loss = loss + self.opts.coherence_coef * coherence_penalty(self.sae.W_dec, self.opts.coherence_cos)
        loss.backward()
        ctx.sum_grads_(list(self.sae.parameters()))
        self.sae.remove_parallel_grad()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)   # memory: gradients live only during this SAE's step
        self.sae.normalize_decoder()
        if self._resample_now(ctx):
            n = resample_dead(self.sae, self.opt, dead, x, out.recon.detach(), generator=torch.Generator(
                device=x.device).manual_seed(int(self.cfg.seed) * 1_000_003 + self.step))
            self.resampled += n
            self.stale[dead] = 0
        if self._resample_now(ctx, self.opts.split_every) and hasattr(self.sae, "encode_sparse"):
            with torch.no_grad():
                vals, idx = self.sae.encode_sparse(x)
            self.split += split_duplicates(self.sae, self.opt, x, out.recon.detach(), idx, vals, cos=self.opts.split_cos)
        if self._resample_now(ctx, self.opts.mix_split_every) and hasattr(self.sae, "encode_sparse"):
            with torch.no_grad():
                vals, idx = self.sae.encode_sparse(x)
                donors = dead.clone()
                for a, b in duplicate_pairs(self.sae.W_dec, self.opts.split_cos):
                    donors[b if int((idx == b).sum()) <= int((idx == a).sum()) else a] = True
            used = split_mixtures(self.sae, self.opt, x, out.recon.detach(), idx, vals, donors,
                                  above=self.opts.mix_split_above)
            self.split += len(used)
            self.stale[used] = 0   # a donor given a direction starts its silence count afresh
        fired = out.fired.to(torch.int32)
        figures = torch.stack([out.loss.detach().float(), out.fvu.detach().float(), out.aux_loss.detach().float(),
                               out.l0.detach().float() * x.shape[0]])
        if ctx.data_parallel:
            ctx.all_reduce_(fired, torch.distributed.ReduceOp.MAX)
            ctx.all_reduce_(figures)
        self.stale += n_global
        self.stale[fired.bool()] = 0
        self.step += 1
        self.tokens += n_global
        loss, fvu, aux, l0sum = figures.tolist()
        return {"loss": loss, "fvu": fvu, "auxk": aux, "l0": l0sum / n_global, "lr": self.lr_at(self.step - 1),
                "dead_fraction": float((self.stale >= self.dead_tokens).float().mean())}

    def _set_sparsity(self) -> None:
        """warm_k: the pursuit's k, rounds and stop for this step (warm phase: exactly warm_k, one a round if the
        SAE picks one a round; after it, the SAE's own)."""
        final, p = self._final_sparsity, self.sae.cfg.params
        total = self.opts.total_steps
        if total is not None and self.step >= self.opts.warm_until * total:
            p.update(final)
            return
        k = int(self.opts.warm_k)
        p.update(k=k, rounds=k if final["rounds"] == final["k"] else min(k, final["rounds"]), stop=0.0)

    def _resample_now(self, ctx: DistContext, every: int | None = None) -> bool:
        every = self.opts.resample_every if every is None else every
        total = self.opts.total_steps
        if not every or ctx.data_parallel or self.step == 0 or (self.step + 1) % every:
            return False
        return total is None or self.step + 1 <= self.opts.resample_until * total

    def timed_step(self, *args) -> dict[str, float]:
        t0 = time.perf_counter()
        out = self.train_step(*args)
        self.step_seconds += time.perf_counter() - t0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"cfg": self.cfg.to_dict(), "model": self.sae.state_dict(), "optim": self.opt.state_dict(),
                "step": self.step, "tokens": self.tokens, "stale": self.stale.cpu(), "recent": self.recent,
                "curve": self.curve, "resampled": self.resampled, "split": self.split}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.sae.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optim"])
        self.step, self.tokens = int(st["step"]), int(st["tokens"])
        self.stale.copy_(st["stale"].to(self.stale.device))
        self.recent = dict(st.get("recent", {}))
        self.curve = [list(p) for p in st.get("curve", [])]
        self.resampled = int(st.get("resampled", 0))
        self.split = int(st.get("split", 0))

    def export(self, scale: float, release: bool = False, first_rows: torch.Tensor | None = None) -> TrainedSAE:
        """The trained SAE in raw units on CPU; `release`: drop the training copy and optimiser state
        (memory: the end of training then holds one copy of each SAE, not three); `first_rows`: the
        normalised first batch, from which a `dec_init: data` decoder's start is rebuilt (drift signal)."""
        if self._final_sparsity is not None:   # a run stopped inside the warm phase still yields the configured SAE
            self.sae.cfg.params.update(self._final_sparsity)
        with self.opt.eval_params():  # schedule-free: the averaged weights
            sae = copy.deepcopy(self.sae).to("cpu").float()
        if release:
            self.sae = self.opt = None
        sae.renormalize_decoder_keeping_output()
        sae.fold_input_scale(scale)
        sae.eval()
        metrics = {f"train_{k}": v for k, v in self.recent.items()}
        metrics.update(tokens_trained=self.tokens, steps=self.step, lr=self.base_lr, optimizer=self.cfg.optimizer,
                       dead_tokens=self.dead_tokens, train_fvu_curve=self.curve, resampled=self.resampled)
        if self.opts.split_every or self.opts.mix_split_every:
            metrics["split"] = self.split
        if self.cfg.dec_init == "data":
            init = data_initial_decoder(self.cfg, first_rows) if first_rows is not None else None
            metrics.update(weight_signals(sae, init=init, drift=init is not None))
        else:
            metrics.update(weight_signals(sae))
        metrics.update(curve_signals(self.curve))
        return TrainedSAE(sae=sae, metrics=metrics)


def auto_dead_tokens(configured: int | None, total_steps: int | None, batch: int) -> int:
    """Silence (in tokens) after which AuxK treats a latent as dead: `configured`, else
    max(4 batches, 1/32 of the run), at most 10M (Gao et al.'s figure for long runs), so that
    AuxK also acts in short runs (docs/training.md)."""
    if configured:
        return int(configured)
    total = (total_steps or 0) * batch
    return int(min(10_000_000, max(4 * batch, total // 32)))


def _autocast_factory(opts: TrainOptions, device: torch.device) -> Callable[[], Any]:
    want = opts.autocast
    if isinstance(want, str):
        want = want.lower()
    if device.type == "cuda" and want in ("auto", True, "true") and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and want in (True, "true"):
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise UserError(f"activations hold NaN/inf ({where}, row {bad[0]}, column {bad[1]}); re-create the "
                        "activation cache (e.g. with cache.dtype=float32) or drop the broken shard.")


def job_fingerprint(configs: list[SAEConfig], opts: TrainOptions, world: tuple[int, str] = (1, "ddp")) -> str:
    keep = {k: v for k, v in vars(opts).items() if k in ("total_steps", "max_steps", "lr_warmup_steps",
                                                         "lr_decay_fraction", "adam_betas", "adam_eps",
                                                         "dead_tokens", "autocast", "decoder_impl",
                                                         "resample_every", "resample_until")}
    if opts.split_every:   # only when on, so that the fingerprints of runs before the option stay the same
        keep.update(split_every=opts.split_every, split_cos=opts.split_cos)
    if opts.mix_split_every:
        keep.update(mix_split_every=opts.mix_split_every, mix_split_above=opts.mix_split_above, split_cos=opts.split_cos)
    if opts.warm_k:
        keep.update(warm_k=opts.warm_k, warm_until=opts.warm_until)
    if opts.coherence_coef:
        keep.update(coherence_coef=opts.coherence_coef, coherence_cos=opts.coherence_cos)
    return make_fingerprint({"saes": [c.to_dict() for c in configs], "opts": keep, "world": list(world)})


def _normalise_configs(configs: list[SAEConfig | dict], d_in: int | None) -> list[SAEConfig]:
    out = []
    for c in configs:
        c = SAEConfig.from_dict(dict(c)) if isinstance(c, dict) else copy.deepcopy(c)
        if not c.d_in and d_in:
            c.d_in = d_in
        out.append(c.validate())
    names = [(c.hook, c.name) for c in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        hook, name = sorted(dup, key=str)[0]
        raise UserError(f"the sweep lists SAE {name} twice{f' for {hook}' if hook else ''}; remove the duplicate.")
    return out


def _pick(batch: Batch, hook: str | None, index: int) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if hook not in batch:
        raise UserError(f"batch {index} has no activations for hook {hook!r} (it has {sorted(batch)}); "
                        "give each SAE config the hook of a batch entry.")
    return batch[hook]


def train_saes(batches: BatchSource, configs: list[SAEConfig | dict], options: TrainOptions | None = None,
               *, d_in: int | None = None, ctx: DistContext | None = None,
               on_step: Callable[[int], None] | None = None) -> list[TrainedSAE]:
    """Train every SAE in `configs` in one pass over `batches`; return them (raw units) with training metrics.

    In `sae_parallel` distributed mode only this rank's SAEs (i % world_size == rank) are returned.
    Raises UserError for bad configs, a width mismatch, NaN/inf in the data, empty data, or a
    checkpoint of a different job at `checkpoint_path`.
    """
    opts = options or TrainOptions()
    ctx = ctx or DistContext(device=torch.device(opts.device))
    device = ctx.device if ctx.world_size > 1 else torch.device(opts.device)
    all_cfgs = _normalise_configs(configs, d_in)
    mine = [c for i, c in enumerate(all_cfgs) if ctx.mode != "sae_parallel" or i % ctx.world_size == ctx.rank]
    if not callable(batches) and opts.total_steps is None and hasattr(batches, "__len__"):
        opts = copy.copy(opts)
        opts.total_steps = len(batches)  # type: ignore[arg-type]
    if opts.max_steps and (opts.total_steps is None or opts.total_steps > opts.max_steps):
        opts = copy.copy(opts)
        opts.total_steps = opts.max_steps
    for c in all_cfgs:   # optimizer auto: signum or Adam by the run's length (safesail/train/optim.py)
        if c.optimizer == "auto":
            c.optimizer = resolve_optimizer("auto", opts.total_steps)
            c.extra["optimizer_rule"] = f"auto ({opts.total_steps or 'unknown'} steps)"
    fp = opts.fingerprint or job_fingerprint(all_cfgs, opts, (ctx.world_size, ctx.mode))
    ck_path = Path(opts.checkpoint_path) if opts.checkpoint_path else None
    if ck_path is not None and ctx.mode == "sae_parallel" and ctx.world_size > 1:
        ck_path = ck_path.with_name(f"{ck_path.stem}.rank{ctx.rank}{ck_path.suffix}")

    states = [SAETrainState(c, opts, device) for c in mine]
    scales: dict[str | None, float] = {}
    first_rows: dict[str | None, torch.Tensor] = {}   # hook -> normalised first batch (CPU), for dec_init: data
    batches_done = 0
    ck = read_checkpoint(ck_path) if ck_path else None
    if ck is not None:
        if ck.get("fingerprint") != fp:
            raise UserError(f"{ck_path} is a half-finished training with another config; re-run with the "
                            "original settings to resume it, or pass train.overwrite=true to discard it.")
        for st in states:
            st.load_state_dict(ck["saes"][f"{st.cfg.hook}/{st.cfg.name}"])
        scales = dict(ck["scales"])
        first_rows = dict(ck.get("first_rows", {}))
        batches_done = int(ck["batches_done"])
        torch.set_rng_state(ck["rng"])
        log.info("resuming %d SAE(s) from %s at batch %d", len(states), ck_path, batches_done)

    def save_checkpoint() -> None:
        if ck_path is None or not (ctx.is_main or ctx.mode == "sae_parallel"):
            return
        atomic_torch_save({"fingerprint": fp, "batches_done": batches_done, "scales": scales, "first_rows": first_rows,
                            "rng": torch.get_rng_state(),
                            "saes": {f"{st.cfg.hook}/{st.cfg.name}": st.state_dict() for st in states}}, ck_path)

    if callable(batches):
        source: Iterable[Batch] = batches(batches_done)
        skip = 0
    else:
        source, skip = batches, batches_done
    autocast_ctx = _autocast_factory(opts, device)
    run = start_wandb(opts, all_cfgs, ctx)
    hooks = sorted({c.hook for c in all_cfgs}, key=str)
    total = opts.total_steps
    bar = tqdm(total=total, initial=batches_done, desc="train SAEs", unit="batch",
               disable=not (opts.progress and ctx.is_main))
    finished = opts.max_steps is not None and batches_done >= opts.max_steps
    it: Iterator[Batch] = iter(source)
    index = -1
    profile = {"data_s": 0.0, "sae_wall_s": 0.0}
    pool = StepPool(opts.sae_threads if not ctx.data_parallel else 1, len(states))
    t_data = time.perf_counter()
    try:
        while not finished:
            try:
                batch = next(it)
            except StopIteration:
                break
            index += 1
            if index < skip:
                continue
            step_idx = batches_done
            for hook in hooks:
                x = _pick(batch, hook, step_idx)
                where = f"batch {step_idx}" + (f" of hook {hook}" if hook else "")
                if x.dim() != 2:
                    raise UserError(f"activation {where} has shape {tuple(x.shape)}; give [batch, d] tensors.")
                hook_cfgs = [c for c in all_cfgs if c.hook == hook]
                if x.shape[1] != hook_cfgs[0].d_in:
                    raise UserError(f"activations ({where}) are {x.shape[1]} wide but the SAE config says "
                                    f"d_in={hook_cfgs[0].d_in}; use a cache of the same model and hook.")
                x = x.to(device=device, dtype=torch.float32, non_blocking=True)
                s1 = torch.cat([x.sum(0, dtype=torch.float64), x.pow(2).sum(dtype=torch.float64).reshape(1),
                                torch.tensor([x.shape[0]], dtype=torch.float64, device=device)])
                if not bool(torch.isfinite(s1).all()):   # NaN/inf anywhere in x make these sums non-finite
                    _check_finite(x, where)
                    raise UserError(f"activations ({where}) are too large to square in float32 (above ~1e19); "
                                    "check the activation cache.")
                if ctx.data_parallel:
                    ctx.all_reduce_(s1)
                n_global = int(s1[-1].item())
                sumsq = float(s1[-2])
                if hook not in scales:
                    scales[hook] = _first_batch_init(x, sumsq, n_global, hook, states, ctx, first_rows)
                s = scales[hook]
                xs = x * s
                mean = s1[:-2] * s / n_global
                total_var = (sumsq * s * s - n_global * mean.pow(2).sum()).float()
                profile["data_s"] += time.perf_counter() - t_data
                mine_now = [st for st in states if st.cfg.hook == hook]
                t_sae = time.perf_counter()
                for st, figures in zip(mine_now, pool.map(lambda st: st.timed_step(xs, (total_var, n_global), ctx,
                                                                                  autocast_ctx), mine_now)):
                    _remember(st, figures)
                    if run is not None and st.step % max(1, opts.log_every) == 0:
                        run.log({f"{st.cfg.hook or 'sae'}/{st.cfg.name}/{k}": v for k, v in figures.items()},
                                step=batches_done + 1)
                profile["sae_wall_s"] += time.perf_counter() - t_sae
                t_data = time.perf_counter()
            batches_done += 1
            bar.update(1)
            if on_step is not None:
                on_step(batches_done)
            if states and batches_done % max(1, opts.log_every) == 0:
                st = states[0]
                log.info("batch %d: %s fvu %.4f l0 %.1f dead %.3f", batches_done, st.cfg.name,
                         st.recent.get("fvu", float("nan")), st.recent.get("l0", float("nan")),
                         st.recent.get("dead_fraction", float("nan")))
            if opts.checkpoint_every and batches_done % opts.checkpoint_every == 0:
                save_checkpoint()
            if opts.max_steps is not None and batches_done >= opts.max_steps:
                break
    finally:
        bar.close()
        pool.close()
        if run is not None:
            run.finish()
    if batches_done == 0:
        raise UserError("there were no activation batches to train on; fill the activation cache first "
                        "(safesail cache) or pass a non-empty iterable.")
    save_checkpoint()
    out = [st.export(scales[st.cfg.hook], release=True, first_rows=first_rows.get(st.cfg.hook)) for st in states]
    for t, st in zip(out, states):
        t.metrics["profile"] = {"shared_data_s": round(profile["data_s"], 3), "all_saes_wall_s":
                                round(profile["sae_wall_s"], 3), "this_sae_step_s": round(st.step_seconds, 3),
                                "sae_threads": pool.workers}
    return out


def _remember(st: SAETrainState, figures: dict[str, float], decay: float = 0.9) -> None:
    """Exponential moving averages of the training figures (reported in metrics.json as train_*)."""
    for k, v in figures.items():
        old = st.recent.get(k)
        st.recent[k] = v if old is None or k in ("lr", "dead_fraction") else decay * old + (1 - decay) * v
    every = max(1, (st.opts.total_steps or 200) // 20)
    if st.step % every == 0 or st.step == st.opts.total_steps:
        st.curve.append([st.step, round(st.recent["fvu"], 5)])


@torch.no_grad()
def _first_batch_init(x: torch.Tensor, sumsq: float, n_global: int, hook: str | None,
                      states: list[SAETrainState], ctx: DistContext,
                      first_rows: dict[str | None, torch.Tensor] | None = None) -> float:
    """Scale to unit mean squared norm (when asked), b_dec and (`dec_init: data`) the decoder rows from the
    first (global) batch; that batch is kept in `first_rows[hook]` when a data-initialised SAE needs it."""
    if sumsq <= 0:
        raise UserError(f"the first activation batch{f' of hook {hook}' if hook else ''} is all zeros; "
                        "check the activation cache.")
    s = 1.0 / math.sqrt(sumsq / n_global)
    normalize = [st.cfg.normalize for st in states if st.cfg.hook == hook]
    if normalize and not all(normalize) and any(normalize):
        raise UserError(f"SAEs on hook {hook} disagree on `normalize`; use one setting per hook.")
    if normalize and not normalize[0]:
        s = 1.0
    full = ctx.all_gather_cat(x) if ctx.data_parallel else x
    mine = [st for st in states if st.cfg.hook == hook]
    for st in mine:
        st.sae.init_b_dec(full * s)
        if st.cfg.dec_init == "data":
            init_decoder_from_data(st.sae, full * s, st.cfg.seed)
    if first_rows is not None and any(st.cfg.dec_init == "data" for st in mine):
        first_rows[hook] = (full * s).detach().float().cpu()
    return s
