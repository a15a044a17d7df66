"""Sparse autograd pieces for TopK-style SAEs.

With k of n latents active per token, the backward pass does not need the dense
`[tokens, latents]` gradient. Two functions keep it sparse:

- `gather_preacts(x, W_enc, b_enc, idx, values)`: the pre-activations at the chosen
  indices (computed already, without grad, by the dense encoder product). Backward:
  `dx` as an embedding-bag over the chosen encoder rows, `dW_enc`/`db_enc` as a sparse
  `[latents, tokens] @ [tokens, d]` product: O(tokens * k * d) instead of O(tokens * n * d).
- `sparse_decode(vals, idx, W_dec)`: `sum_j vals[:, j] * W_dec[idx[:, j]]` as an
  embedding-bag. Backward: `dvals` as a sampled dense-dense product (SDDMM) at the k
  chosen positions, `dW_dec` as a sparse product.

`dense_decode` scatters the codes into `[tokens, latents]` and multiplies: on a GPU that
is faster than the embedding-bag at large k (measured by sparsify's authors and ours:
reference/anchors.md), so `choose_decoder` picks it there.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F



def sparse_rows_product(idx: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """`S.T @ x` for the sparse `S[i, idx[i, j]] = coef[i, j]` of shape [b, n]: a [n, d] tensor.

    `S.T` is built directly in CSR form (entries sorted by latent): on CPU 1.3-1.7x faster than
    the COO product, which coalesces (sorts) on every call (benchmarks in docs/training.md)."""
    b, k = idx.shape
    flat = idx.reshape(-1)
    order = flat.argsort()
    rows = torch.div(order, k, rounding_mode="floor")
    crow = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    crow[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = torch.sparse_csr_tensor(crow, rows, coef.reshape(-1)[order].to(x.dtype), (n, b), check_invariants=False)
        return s @ x


def sampled_rows_dot(g: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`out[i, j] = g[i] . w[idx[i, j]]` (an SDDMM) without materialising `[b, n]` or `[b, k, d]`."""
    b, k = idx.shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            crow = torch.arange(0, b * k + 1, k, device=idx.device)
            pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(b * k, dtype=g.dtype, device=g.device),
                                              (b, w.shape[0]), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, g, w.t().to(g.dtype), beta=0.0).values().view(b, k)
    except (RuntimeError, NotImplementedError):  # dtype/device without SDDMM support: dense fallback
        return (g @ w.t().to(g.dtype)).gather(1, idx)


class _GatherPreacts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, idx, values):
        ctx.save_for_backward(x, weight, idx)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, weight, idx = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, weight, mode="sum", per_sample_weights=grad.to(weight.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = sparse_rows_product(idx, grad.float(), x.float(), weight.shape[0]).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, idx.reshape(-1), grad.reshape(-1).to(weight.dtype))
        return grad_x, grad_w, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, idx, weight):
        ctx.save_for_backward(vals, idx, weight)
        return F.embedding_bag(idx, weight, mode="sum", per_sample_weights=vals.to(weight.dtype))

    @staticmethod
    def backward(ctx, grad):
        vals, idx, weight = ctx.saved_tensors
        grad_vals = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_vals = sampled_rows_dot(grad.float(), weight.float(), idx).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = sparse_rows_product(idx, vals.float(), grad.float(), weight.shape[0]).to(weight.dtype)
        return grad_vals, None, grad_w


def gather_preacts(x, weight, bias, idx, values):
    """Pre-activations `x @ weight[idx].T + bias[idx]` (given as `values`) with a sparse backward."""
    return _GatherPreacts.apply(x, weight, bias, idx, values)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`sum_j vals[:, j] * weight[idx[:, j]]` with a sparse backward."""
    return _SparseDecode.apply(vals, idx, weight)


def dense_decode(vals: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same as `sparse_decode` through a dense `[b, n] @ [n, d]` product (faster on GPUs at large k)."""
    z = torch.zeros(idx.shape[0], weight.shape[0], dtype=vals.dtype, device=vals.device).scatter(1, idx, vals)
    return z @ weight.to(z.dtype)


def choose_decoder(impl: str, k: int, device: torch.device):
    """`sparse_decode` or `dense_decode` for `impl` in auto | sparse | dense.

    auto: sparse on CPU (measured faster at every k we tried); on a GPU sparse up to k = 64,
    dense above (the embedding-bag decode grows with k while the dense product does not).
    """
    if impl == "sparse":
        return sparse_decode
    if impl == "dense":
        return dense_decode
    if device.type == "cpu":
        return sparse_decode
    return sparse_decode if k <= 64 else dense_decode
