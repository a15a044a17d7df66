"""Evaluate SAEs on held-out data: reconstruction figures and the language-model cost of splicing.

- `evaluate_reconstruction(saes, batches)`: FVU (sum of squared errors over the total
  variance of the held-out activations), L0 (mean active latents per token), the dead
  fraction (latents that never fire on the held-out tokens) and the dense fraction (latents
  firing on more than 10% of them).
- `evaluate_ce(model, hook, saes, windows)`: next-token cross-entropy of the model clean, with
  the hook's output replaced by each SAE's reconstruction (spliced), and zero-ablated;
  `ce_loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)` and the mean KL
  divergence KL(clean || spliced) per token. Special (chat-template) tokens keep their
  original activation, since the SAEs never saw them. `ce_loss_recovered_se` is its
  delete-one-window jackknife standard error: the denominator is small at middle layers
  (zero-ablating one MLP costs ~0.1 nat), so a few thousand tokens resolve 0.8 only roughly.
  `ce_loss_increase` (CE_spliced - CE_clean, nats per token) with `ce_loss_increase_se` (the
  standard error of the window-paired difference) is the figure that does not divide by that
  small cost: compare SAEs of one hook by it when the zero-ablation cost is small.
- `evaluate_ce_hooks(model, {hook: saes}, windows)`: the same for several hooks of one cache,
  sharing the clean forward of each window (the train stage's path).
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from safesail.hooks import HookPoint, special_token_mask, splice
from safesail.saes import SAE

log = logging.getLogger(__name__)
DENSE_DENSITY = 0.1   # a latent firing on more than this share of held-out tokens counts as dense


EVAL_ROWS = 1024      # rows encoded at a time: each SAE's eval buffers are EVAL_ROWS x n_latents at most


def _sparse_topk(sae: SAE) -> bool:
    """True for SAEs whose `encode` is TopK's (codes as (values, indices) without a dense [rows, n] tensor)."""
    from safesail.saes.archs.topk import TopKSAE

    return isinstance(sae, TopKSAE) and type(sae).encode is TopKSAE.encode


@torch.no_grad()
def _reconstruct(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reconstruction [rows, d], latents that fired [rows * k] or [n] counts, active count) of `x`."""
    if _sparse_topk(sae):
        vals, idx = sae.encode_sparse(x)
        r = F.embedding_bag(idx, sae.W_dec, mode="sum", per_sample_weights=vals.to(sae.W_dec.dtype)) + sae.b_dec
        on = vals > 0
        return r, torch.bincount(idx[on], minlength=sae.cfg.n_latents), on.sum()
    z = sae.encode(x)
    active = z > 0
    return sae.decode(z), active.sum(0), active.sum()


@torch.no_grad()
def evaluate_reconstruction(saes: Sequence[SAE], batches: Iterable[torch.Tensor],
                            device: str | torch.device = "cpu", max_tokens: int | None = None) -> list[dict]:
    """FVU, L0 and dead fraction of each SAE on the same held-out activation batches (raw units).

    Batches are encoded EVAL_ROWS rows at a time (TopK SAEs through their sparse codes), so the
    buffers do not grow with the eval batch size."""
    device = torch.device(device)
    sse = [0.0] * len(saes)
    l0 = [0.0] * len(saes)
    fired = [torch.zeros(s.cfg.n_latents, dtype=torch.long, device=device) for s in saes]
    n, sum_x, sumsq = 0, None, 0.0
    for x in batches:
        if max_tokens is not None and n >= max_tokens:
            break
        x = x.to(device=device, dtype=torch.float32)
        if max_tokens is not None:
            x = x[: max_tokens - n]
        n += x.shape[0]
        xd = x.double()
        sum_x = xd.sum(0) if sum_x is None else sum_x + xd.sum(0)
        sumsq += float(xd.pow(2).sum())
        for chunk in x.split(EVAL_ROWS):
            for i, sae in enumerate(saes):
                r, counts, active = _reconstruct(sae, chunk)
                sse[i] += float((chunk - r).double().pow(2).sum())
                l0[i] += float(active)
                fired[i] += counts
    if n == 0:
        return [{"fvu": math.nan, "l0": math.nan, "dead_fraction": math.nan, "dense_fraction": math.nan,
                 "eval_tokens": 0} for _ in saes]
    total_var = sumsq - float(sum_x.pow(2).sum()) / n
    return [{"fvu": sse[i] / total_var if total_var > 0 else math.nan, "l0": l0[i] / n,
             "dead_fraction": float((fired[i] == 0).float().mean()),
             "dense_fraction": float((fired[i] > DENSE_DENSITY * n).float().mean()), "eval_tokens": n}
            for i in range(len(saes))]


def _ce_rows(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of each row (float64 [rows])."""
    lp = logits[:, :-1].float()
    tgt = ids[:, 1:]
    ce = F.cross_entropy(lp.reshape(-1, lp.shape[-1]), tgt.reshape(-1), reduction="none")
    return ce.reshape(tgt.shape).sum(1).double()


def _kl_sum(logp_clean: torch.Tensor, logits: torch.Tensor) -> float:
    """Summed KL(clean || spliced) over the next-token positions, one window at a time (float32
    [positions, vocab] buffers of one window, not of the whole batch)."""
    total = 0.0
    for lc, lg in zip(logp_clean, logits):
        lp = lg[:-1].float().log_softmax(-1)
        total += float((lc.exp() * (lc - lp)).sum())
    return total


def jackknife_recovered_se(clean: torch.Tensor, zero: torch.Tensor, spliced: torch.Tensor) -> float:
    """Delete-one-row jackknife standard error of (sum zero - sum spliced) / (sum zero - sum clean)."""
    m = clean.numel()
    if m < 2:
        return math.nan
    num = (zero - spliced)
    den = (zero - clean)
    loo_den = den.sum() - den
    if bool((loo_den.abs() < 1e-9).any()):
        return math.nan
    loo = (num.sum() - num) / loo_den
    return float(((m - 1) / m * (loo - loo.mean()).pow(2).sum()).sqrt())


def paired_increase_se(clean: torch.Tensor, spliced: torch.Tensor, tokens: int) -> float:
    """Standard error of (sum spliced - sum clean) / tokens, the windows as the paired units.

    Each window holds the same number of predicted tokens, so the per-token mean difference is
    the mean of per-window sums over a constant; its error is the windows' spread of that."""
    m = clean.numel()
    if m < 2:
        return math.nan
    per_window = (spliced - clean) * (m / tokens)     # per-token difference of each window
    return float(per_window.std(unbiased=True) / math.sqrt(m))


@torch.no_grad()
def evaluate_ce(model, tokenizer, hook: str, saes: Sequence[SAE], windows: Iterable[torch.Tensor],
                batch_size: int = 4, max_tokens: int | None = None, progress: bool = True) -> list[dict]:
    """CE loss clean / spliced / zero-ablated, CE recovered and KL to clean, for each SAE at `hook`."""
    return evaluate_ce_hooks(model, tokenizer, {hook: saes}, windows, batch_size, max_tokens, progress)[hook]


@torch.no_grad()
def evaluate_ce_hooks(model, tokenizer, saes_by_hook: dict[str, Sequence[SAE]], windows: Iterable[torch.Tensor],
                      batch_size: int = 4, max_tokens: int | None = None,
                      progress: bool = True) -> dict[str, list[dict]]:
    """`evaluate_ce` for several hooks on the same token windows: the clean forward is run once per
    window for all hooks (then one zero-ablated and one spliced forward per hook and SAE)."""
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    used = 0
    for w in windows:
        if max_tokens is not None and used >= max_tokens:
            break
        rows.append(w)
        used += w.numel()
    if not rows:
        return {h: [{} for _ in saes] for h, saes in saes_by_hook.items()}
    points = {h: HookPoint.parse(h) for h in saes_by_hook}
    clean_rows: list[torch.Tensor] = []
    zero_rows: dict[str, list[torch.Tensor]] = {h: [] for h in saes_by_hook}
    spliced_rows = {h: [[] for _ in saes] for h, saes in saes_by_hook.items()}
    kl = {h: [0.0] * len(saes) for h, saes in saes_by_hook.items()}
    count = 0
    bar = tqdm(total=len(rows), desc=f"CE eval {', '.join(saes_by_hook)}", unit="window", disable=not progress)
    for i in range(0, len(rows), batch_size):
        ids = torch.stack(rows[i:i + batch_size]).to(device)
        keep = ~special_token_mask(tokenizer, ids)  # positions where the SAE replaces the activation

        def replace(fn):
            def inner(act):
                new = fn(act.reshape(-1, act.shape[-1]).float()).reshape(act.shape).to(act.dtype)
                return torch.where(keep[..., None], new, act)
            return inner

        logits = model(input_ids=ids, use_cache=False).logits
        clean_rows.append(_ce_rows(logits, ids).cpu())
        count += ids[:, 1:].numel()
        logp_clean = logits[:, :-1].float().log_softmax(-1)
        del logits
        for hook, saes in saes_by_hook.items():
            hp = points[hook]
            with splice(model, hp, replace(torch.zeros_like)):
                zero_rows[hook].append(_ce_rows(model(input_ids=ids, use_cache=False).logits, ids).cpu())
            for j, sae in enumerate(saes):
                sae_dev = sae.to(device)
                with splice(model, hp, replace(sae_dev)):
                    lg = model(input_ids=ids, use_cache=False).logits
                spliced_rows[hook][j].append(_ce_rows(lg, ids).cpu())
                kl[hook][j] += _kl_sum(logp_clean, lg)
                del lg
        bar.update(ids.shape[0])
    bar.close()
    clean_t = torch.cat(clean_rows)
    ce_clean = float(clean_t.sum()) / count
    out: dict[str, list[dict]] = {}
    for hook, saes in saes_by_hook.items():
        zero_t = torch.cat(zero_rows[hook])
        ce_zero = float(zero_t.sum()) / count
        denom = ce_zero - ce_clean
        ok = abs(denom) > 1e-9
        out[hook] = []
        for j in range(len(saes)):
            spl = torch.cat(spliced_rows[hook][j])
            ce = float(spl.sum()) / count
            out[hook].append({"ce_loss_clean": ce_clean, "ce_loss_spliced": ce, "ce_loss_zero_ablation": ce_zero,
                              "ce_loss_recovered": (ce_zero - ce) / denom if ok else math.nan,
                              "ce_loss_recovered_se": jackknife_recovered_se(clean_t, zero_t, spl) if ok else math.nan,
                              "ce_loss_increase": ce - ce_clean,
                              "ce_loss_increase_se": paired_increase_se(clean_t, spl, count),
                              "kl_to_clean": kl[hook][j] / count, "ce_tokens": count})
    return out
