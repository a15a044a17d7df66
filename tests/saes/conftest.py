"""Fixtures of the SAE tests: a row-by-row float64 orthogonal matching pursuit to check the batched one against."""

from __future__ import annotations

import pytest
import torch


def omp_reference(sae, x, ridge=1e-4):
    """Codes of `x` by orthogonal matching pursuit, row by row in float64, from the SAE's own parameters: each round
    (`sae._schedule()`) takes its latents by the selection scores on the residual (decoder or encoder, as the SAE's
    `select`), then all chosen codes by (ridge) least squares on their decoder rows, clamped at 0; with the SAE's
    `stop` > 0 no further round once |r|^2 <= stop |x - b_dec|^2."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    stop = float(getattr(sae.cfg, "stop", 0.0) or 0.0)
    z = torch.zeros(x.shape[0], sae.cfg.n_latents, dtype=torch.float64)
    for i, row in enumerate(x.double()):
        xc = row - b_dec
        r, taken = xc, []
        for m in sae._schedule():
            if stop > 0 and taken and float(r @ r) <= stop * float(xc @ xc):
                break
            pre = W_dec @ r if sae.cfg.select == "decoder" else W_enc @ r + b_enc
            pre[taken] = float("-inf")
            taken += pre.topk(m).indices.tolist()
            D = W_dec[taken]
            v = torch.linalg.solve(D @ D.T + ridge * torch.eye(len(taken), dtype=torch.float64), D @ xc).clamp_min(0)
            z[i] = 0
            z[i, taken] = v
            r = xc - v @ D
    return z


@pytest.fixture(name="omp_reference")
def omp_reference_fixture():
    return omp_reference
