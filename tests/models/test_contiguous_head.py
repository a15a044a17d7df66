"""The unembedding gets a contiguous input (a strided slice made torch's CPU bf16 linear ~500x slower)."""

from __future__ import annotations

import torch

from safesail.models.loading import contiguous_head_input


def test_loaded_model_feeds_its_head_a_contiguous_input_with_the_same_logits(tiny_model):
    m = tiny_model.model
    head = m.get_output_embeddings()
    assert getattr(head, "_safesail_contiguous", False)        # load_model registered it
    seen = []
    probe = head.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous()))
    try:
        ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
        with torch.no_grad():
            last = m(input_ids=ids, logits_to_keep=1).logits[:, -1]
            full = m(input_ids=ids).logits[:, -1]
            x = torch.randn(2, 5, head.in_features)
            assert torch.equal(head(x[:, -1:]), head(x[:, -1:].contiguous()))
    finally:
        probe.remove()
    assert seen and all(seen)
    assert torch.allclose(last, full, atol=1e-5)
    contiguous_head_input(m)                                     # idempotent: one hook, not two
    assert len([h for h in head._forward_pre_hooks.values() if getattr(h, "__name__", "") == "_contiguous"]) == 1
