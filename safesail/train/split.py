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

`split_mixtures(...)`: dead and duplicate latents take half of a live latent whose rows show two
directions (`mixture_scores`: second / first eigenvalue of what it explains; TrainOptions
`mix_split_every`, `mix_split_above`). `coherence_penalty(w_dec, cos)`: the smooth alternative, a loss term
`sum over pairs of relu(|cos_ij| - cos)^2 / n` that pushes decoder rows apart only above the
threshold (TrainOptions `coherence_coef`, `coherence_cos`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safesail.train.resample import _reset_state


def coherence_penalty(w_dec: torch.Tensor, cos: float) -> torch.Tensor:
    """sum_{i<j} relu(|cos(w_i, w_j)| - cos)^2 / n over the decoder rows (differentiable)."""
    w = F.normalize(w_dec.float(), dim=1)
    c = torch.triu(w @ w.T, diagonal=1).abs()
    return (c - cos).relu().pow(2).sum() / w.shape[0]


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


@torch.no_grad()
def mixture_scores(sae, x: torch.Tensor, recon: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor,
                   min_rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(score [n], rows [n]) per latent: over the rows it fires on, what it explains, `y = x - recon + v w`
    (its own share plus what is left) as unit vectors, and the ratio of the second to the first
    eigenvalue of their second-moment matrix. A latent on one feature sees one direction plus
    scattered leftovers (planted easy, trained pursuit: median 0.06, 95th percentile 0.15); a latent
    between two features sees two (0.32-0.50). Latents on fewer than `min_rows` rows score 0."""
    n = sae.cfg.n_latents
    err = x.float() - recon.float()
    w = F.normalize(sae.W_dec.float(), dim=1)
    on = vals > 0
    r_of = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx)[on]
    lat, v = idx[on], vals[on].float()
    rows = torch.bincount(lat, minlength=n)
    score = torch.zeros(n, device=x.device)
    cand = (rows >= min_rows).nonzero().flatten()
    if cand.numel() == 0:
        return score, rows
    order = lat.argsort()
    lat, r_of, v = lat[order], r_of[order], v[order]
    y = F.normalize(err[r_of] + v[:, None] * w[lat], dim=1)
    starts = torch.cumsum(rows, 0) - rows
    moments = torch.stack([y[int(starts[m]):int(starts[m] + rows[m])].T @ y[int(starts[m]):int(starts[m] + rows[m])]
                           for m in cand.tolist()])
    ev = torch.linalg.eigvalsh(moments)
    score[cand] = ev[:, -2] / ev[:, -1].clamp_min(1e-12)
    return score, rows


@torch.no_grad()
def split_mixtures(sae, opt: torch.optim.Optimizer, x: torch.Tensor, recon: torch.Tensor, idx: torch.Tensor,
                   vals: torch.Tensor, donors: torch.Tensor, above: float = 0.3, min_rows: int = 8,
                   iters: int = 5) -> list[int]:
    """Give each donor latent (`donors` [n] bool: dead ones, duplicates) half of a mixture latent: the live
    latents of highest `mixture_scores` (above `above`, firing on >= `min_rows` rows) are split by a
    two-centroid spherical k-means of what they explain; the latent keeps the centroid nearer its
    row, the donor takes the other (encoder row: that direction at the latent's encoder norm, its
    bias). Optimiser state of both rows reset. Return the donors used."""
    donor_ids = donors.nonzero().flatten().tolist()
    if not donor_ids:
        return []
    score, rows = mixture_scores(sae, x, recon, idx, vals, min_rows)
    ok = (rows >= min_rows) & (score > above) & ~donors
    cand = torch.where(ok, score, torch.full_like(score, float("-inf"))).argsort(descending=True)[: len(donor_ids)]
    cand = [int(m) for m in cand.tolist() if bool(ok[m])]
    err = x.float() - recon.float()
    w = F.normalize(sae.W_dec.float(), dim=1)
    done = []
    for m, dnr in zip(cand, donor_ids):
        r, slot = (idx == m).nonzero(as_tuple=True)
        v = vals[r, slot].float()
        keep = v > 0
        y = F.normalize(err[r[keep]] + v[keep, None] * w[m], dim=1)
        if y.shape[0] < min_rows:
            continue
        c = torch.stack([w[m], y[(y @ w[m]).argmin()]])
        for _ in range(iters):
            lab = (y @ c.T).argmax(1)
            if int(lab.sum()) in (0, lab.numel()):
                break
            c = F.normalize(torch.stack([y[lab == 0].sum(0), y[lab == 1].sum(0)]), dim=1)
        else:
            lab = (y @ c.T).argmax(1)
        if int(lab.sum()) in (0, lab.numel()):
            continue
        if float(c[0] @ w[m]) < float(c[1] @ w[m]):
            c = c.flip(0)
        enc_norm = sae.W_enc[m].norm()
        for latent, direction in ((m, c[0]), (dnr, c[1])):
            sae.W_dec[latent] = direction.to(sae.W_dec.dtype)
            sae.W_enc[latent] = (direction * enc_norm).to(sae.W_enc.dtype)
        sae.b_enc[dnr] = sae.b_enc[m]
        done += [m, dnr]
    if done:
        _reset_state(opt, sae, torch.tensor(done, device=sae.W_dec.device))
    return done[1::2]
