"""Sparse autograd pieces for TopK-style SAEs.

With k of n latents active per token, the backward pass does not need the dense
`[tokens, latents]` gradient. These keep it sparse:

- `gather_preacts(x, W_enc, b_enc, idx, values, b_dec=None, pattern=None)`: the pre-activations
  at the chosen indices (computed already, without grad, by the dense encoder product).
  Backward: `dW_enc` as a sparse `[latents, tokens] @ [tokens, d]` product (O(tokens * k * d)
  instead of O(tokens * n * d)), `db_enc` as an index-add; with `b_dec` (x = x_raw - b_dec,
  x_raw constant) the gradient reaches b_dec as `-(db_enc @ W_enc)`, one `[n] @ [n, d]` product,
  instead of a `[tokens, d]` input gradient (an embedding-bag over tokens * k rows).
- `sparse_decode(vals, idx, W_dec, pattern=None)`: `sum_j vals[:, j] * W_dec[idx[:, j]]` as an
  embedding-bag. Backward: `dvals` as a sampled dense-dense product (SDDMM) at the k
  chosen positions, `dW_dec` as a sparse product.
- `RowsPattern(idx, n)`: the CSR layout (sort by latent) of the top-k indices, built once per
  step and shared by the encoder's and decoder's weight-gradient products.
- `dense_columns_codes(...)`: codes on a few encoder columns (AuxK's dead latents) with their
  gradient as dense products of that width: with a few hundred dead latents, faster than
  gathering k_aux rows per token (safesail/saes/base.py picks one or the other).

`dense_decode` scatters the codes into `[tokens, latents]` and multiplies: on a GPU that
is faster than the embedding-bag at large k (measured by sparsify's authors and ours:
reference/anchors.md), so `choose_decoder` picks it there.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F



class RowsPattern:
    """The CSR layout of `S.T` for the sparse `S[i, idx[i, j]]` ([b, n]): entries sorted by latent.

    Built lazily once and shared by every product with the same `idx` in a step (the encoder's
    and the decoder's weight gradients use the same top-k indices): one argsort instead of two."""

    def __init__(self, idx: torch.Tensor, n: int):
        self.idx, self.n = idx, n
        self._csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(crow [n + 1], column = token row of each entry, order: entry -> flat position in idx)."""
        if self._csr is None:
            b, k = self.idx.shape
            flat = self.idx.reshape(-1)
            order = flat.argsort()
            rows = torch.div(order, k, rounding_mode="floor")
            crow = torch.zeros(self.n + 1, dtype=torch.long, device=self.idx.device)
            crow[1:] = torch.bincount(flat, minlength=self.n).cumsum(0)
            self._csr = (crow, rows, order)
        return self._csr


def sparse_rows_product(idx: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, n: int,
                        pattern: RowsPattern | None = None) -> torch.Tensor:
    """`S.T @ x` for the sparse `S[i, idx[i, j]] = coef[i, j]` of shape [b, n]: a [n, d] tensor.

    Entries sorted by latent (`RowsPattern`); on CPU row j of the result is an embedding-bag
    over the token rows of x that chose latent j (2.5-5x faster than torch's CSR product there,
    docs/training.md); elsewhere a CSR `S.T` times x (itself 1.3-1.7x the COO product on CPU)."""
    crow, rows, order = (pattern or RowsPattern(idx, n)).csr()
    if x.device.type == "cpu":
        return F.embedding_bag(rows, x, crow[:-1], mode="sum", per_sample_weights=coef.reshape(-1)[order].to(x.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = torch.sparse_csr_tensor(crow, rows, coef.reshape(-1)[order].to(x.dtype), (n, idx.shape[0]),
                                    check_invariants=False)
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
    def forward(ctx, x, weight, bias, idx, values, b_dec, pattern):
        ctx.save_for_backward(x, weight, idx)
        ctx.pattern = pattern
        return values

    @staticmethod
    def backward(ctx, grad):
        x, weight, idx = ctx.saved_tensors
        grad_x = grad_w = grad_b = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, weight, mode="sum", per_sample_weights=grad.to(weight.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = sparse_rows_product(idx, grad.float(), x.float(), weight.shape[0], ctx.pattern).to(weight.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[5]:
            per_latent = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            per_latent.index_add_(0, idx.reshape(-1), grad.reshape(-1).float())
            if ctx.needs_input_grad[2]:
                grad_b = per_latent.to(weight.dtype)
            if ctx.needs_input_grad[5]:  # pre = (x - b_dec) W^T + b: d/d b_dec = -(sum of grads per latent) @ W
                grad_b_dec = -(per_latent @ weight.float()).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, grad_b_dec, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, idx, weight, pattern):
        ctx.save_for_backward(vals, idx, weight)
        ctx.pattern = pattern
        return F.embedding_bag(idx, weight, mode="sum", per_sample_weights=vals.to(weight.dtype))

    @staticmethod
    def backward(ctx, grad):
        vals, idx, weight = ctx.saved_tensors
        grad_vals = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_vals = sampled_rows_dot(grad.float(), weight.float(), idx).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = sparse_rows_product(idx, vals.float(), grad.float(), weight.shape[0], ctx.pattern).to(weight.dtype)
        return grad_vals, None, grad_w, None


def gather_preacts(x, weight, bias, idx, values, b_dec=None, pattern: RowsPattern | None = None):
    """Pre-activations `x @ weight[idx].T + bias[idx]` (given as `values`) with a sparse backward.

    With `b_dec`, `x` is the centred input `x_raw - b_dec` with `x_raw` constant (pass it
    detached): the gradient reaches `b_dec` as one `[n] @ [n, d]` product of the per-latent
    gradient sums instead of a `[b, d]` input gradient (an embedding-bag over `b * k` rows)."""
    return _GatherPreacts.apply(x, weight, bias, idx, values, b_dec, pattern)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                  pattern: RowsPattern | None = None) -> torch.Tensor:
    """`sum_j vals[:, j] * weight[idx[:, j]]` with a sparse backward."""
    return _SparseDecode.apply(vals, idx, weight, pattern)


class _DenseColumns(torch.autograd.Function):
    """Codes on a few columns `cols` of the encoder, dense `[b, len(cols)]`: `values` (the ReLU'd
    kept pre-activations, 0 elsewhere) with the gradient of `(x - b_dec) W[cols]^T + b[cols]`
    where `values > 0`, through dense products of that width (AuxK's dead latents)."""

    @staticmethod
    def forward(ctx, x, b_dec, weight, bias, cols, values):
        ctx.save_for_backward(x, weight, cols, values)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, weight, cols, values = ctx.saved_tensors
        g = (grad * (values > 0)).float()
        grad_w = grad_b = grad_b_dec = None
        if ctx.needs_input_grad[2]:
            grad_w = torch.zeros_like(weight).index_copy_(0, cols, (g.t() @ x.float()).to(weight.dtype))
        per_col = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device).index_copy_(
                0, cols, per_col.to(weight.dtype))
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(per_col @ weight.index_select(0, cols).float()).to(weight.dtype)
        return None, grad_b_dec, grad_w, grad_b, None, None


def dense_columns_codes(x, b_dec, weight, bias, cols, values):
    """See `_DenseColumns`; `x` is the centred input (detached), `values` `[b, len(cols)]`."""
    return _DenseColumns.apply(x, b_dec, weight, bias, cols, values)


def dense_decode(vals: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, pattern=None) -> torch.Tensor:
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
