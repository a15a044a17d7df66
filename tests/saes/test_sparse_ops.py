"""The sparse TopK autograd pieces give the dense product's values and gradients."""

from __future__ import annotations

import pytest
import torch

from safesail.saes.sparse_ops import dense_decode, gather_preacts, sparse_decode, sparse_rows_product


@pytest.mark.parametrize("b,n,d,k", [(64, 256, 16, 4), (7, 5, 3, 5), (1, 40, 8, 1)])
def test_sparse_rows_product_equals_dense(b, n, d, k):
    torch.manual_seed(0)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(b)])
    coef, x = torch.randn(b, k), torch.randn(b, d)
    dense = torch.zeros(b, n).scatter_(1, idx, coef)
    torch.testing.assert_close(sparse_rows_product(idx, coef, x, n), dense.t() @ x, rtol=1e-5, atol=1e-5)


def test_sparse_encoder_and_decoder_gradients_equal_dense():
    torch.manual_seed(0)
    b, n, d, k = 32, 128, 16, 6
    x = torch.randn(b, d, requires_grad=True)
    w_enc = torch.randn(n, d, requires_grad=True)
    b_enc = torch.randn(n, requires_grad=True)
    w_dec = torch.randn(n, d, requires_grad=True)
    target = torch.randn(b, d)

    def loss(sparse: bool):
        pre = torch.nn.functional.linear(x, w_enc, b_enc)
        top, idx = pre.detach().topk(k, dim=1)
        vals = gather_preacts(x, w_enc, b_enc, idx, top.clone()) if sparse else pre.gather(1, idx)
        recon = (sparse_decode if sparse else dense_decode)(vals.relu(), idx, w_dec)
        return (recon - target).pow(2).sum()

    grads = []
    for sparse in (True, False):
        for t in (x, w_enc, b_enc, w_dec):
            t.grad = None
        loss(sparse).backward()
        grads.append([t.grad.clone() for t in (x, w_enc, b_enc, w_dec)])
    for g_sparse, g_dense in zip(*grads):
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-4)
