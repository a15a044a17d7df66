"""Duplicate split: of two latents whose decoder rows nearly coincide, move one to what the pair leaves unexplained.

With as many latents as features, a latent that duplicates another (decoder cosine >= `cos`) is
width that a feature lacks; on planted data the feature it lacks is usually a neighbour of the
pair's (the rows the pair fires on hold it, and its share of them is what the pair fails to
reconstruct). `split_duplicates(sae, opt, x, recon, idx, vals)` pairs the rows greedily from the most
similar pair down (each latent in at most one pair), and for each pair moves the latent that
fired less in this batch to the first principal direction of the residual `x - recon` over the
rows where either latent fired (sign: positive mean projection): decoder row = that unit
direction, encoder row = the same direction at the latent's own encoder norm, encoder bias
kept, optimiser state of the row reset (as resampling does: safesail/train/resample.py). Unlike
resampling from one high-error row, the new direction comes from the rows the latent already
sees, so it keeps firing there. The trainer calls it every `split_every` steps until
`resample_until` of the run (TrainOptions; measured on planted `hard`: docs/training.md, session 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safesail.train.resample import _reset_state


@torch.no_grad()
def duplicate_pairs(w_dec: torch.Tensor, cos: float) -> list[tuple[int, int]]:
    """Disjoint pairs (i, j) of decoder rows at cosine >= `cos`, most similar first."""
    w = F.normalize(w_dec.detach().float(), dim=1)
    c = torch.triu(w @ w.T, diagonal=1)
    i, j = (c >= cos).nonzero(as_tuple=True)
    if i.numel() == 0:
        return []
    order = c[i, j].argsort(descending=True)
    used: set[int] = set()
    pairs = []
    for a, b in zip(i[order].tolist(), j[order].tolist()):
        if a in used or b in used:
            continue
        used.update((a, b))
        pairs.append((a, b))
    return pairs


@torch.no_grad()
def split_duplicates(sae, opt: torch.optim.Optimizer, x: torch.Tensor, recon: torch.Tensor, idx: torch.Tensor,
                     vals: torch.Tensor, cos: float = 0.9, min_rows: int = 4) -> int:
    """Move one latent of each near-duplicate pair (see the module doc); `idx`, `vals` [b, k]: the batch's
    sparse codes. Return how many latents moved."""
    pairs = duplicate_pairs(sae.W_dec, cos)
    if not pairs:
        return 0
    n = sae.cfg.n_latents
    active = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)
    active.scatter_(1, idx, vals > 0)
    count = active.sum(0)
    err = x.float() - recon.float()
    moved = []
    for a, b in pairs:
        m = a if count[a] < count[b] else b
        rows = active[:, a] | active[:, b]
        if int(rows.sum()) < min_rows:
            continue
        e = err[rows]
        u = torch.linalg.svd(e, full_matrices=False).Vh[0]
        if float((e @ u).mean()) < 0:
            u = -u
        enc_norm = sae.W_enc[m].norm()
        sae.W_dec[m] = u.to(sae.W_dec.dtype)
        sae.W_enc[m] = (u * enc_norm).to(sae.W_enc.dtype)
        moved.append(m)
    if moved:
        _reset_state(opt, sae, torch.tensor(moved, device=sae.W_dec.device))
    return len(moved)
