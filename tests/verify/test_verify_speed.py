"""Speed changes of the verify stage that must leave every figure as it was (issue 15, session 6)."""

from __future__ import annotations

import pytest

from safesail.hooks import HookPoint
from safesail.verify.generation import residual_norms
from safesail.verify.steering import residual_norm


@pytest.mark.usefixtures("one_thread")
def test_residual_norms_of_several_hooks_from_one_pass_equal_one_pass_per_hook(tiny_model):
    lm = tiny_model
    prompts = [lm.tokenizer(t)["input_ids"] for t in ("How do I bake bread?", "Tell me about the sea today.",
                                                      "Name three rivers.")]
    hooks = [HookPoint(1), HookPoint(0), HookPoint(1, "resid")]
    got = residual_norms(lm, hooks, prompts)
    assert set(got) == {h.name for h in hooks}
    for h in hooks:
        assert got[h.name] == residual_norm(lm, h, prompts)     # to the bit
    assert got[HookPoint(0).name] != got[HookPoint(1).name]
    assert residual_norms(lm, hooks, []) == {h.name: 0.0 for h in hooks}


@pytest.fixture(scope="module", params=[("llama", "bfloat16"), ("qwen2", "bfloat16"), ("qwen2", "float32")])
def tiny_lm(request, cache_dir):
    from safesail.config import compose
    from safesail.models import load_model

    arch, dtype = request.param
    cfg = compose(["model=tiny", f"model.architecture={arch}", f"model.dtype={dtype}"])
    return load_model(cfg.model, "cpu", cache_dir=cache_dir)


@pytest.mark.usefixtures("one_thread")
def test_pooled_normalisers_are_the_per_request_ones(tiny_lm):
    """The judge's engine computes every request's softmax normalisers of a batch in shared head calls
    (`LocalEngine._fill_lse`): the log-probs are the per-request calls' to the bit, for requests with one
    wanted position (the judge), several, every position, and more than `LSE_ROWS` (own call). A float32 head
    (not the same bits in calls of different sizes) keeps one call per request."""
    import torch

    from safesail.interpret.clients.local_engine import LSE_ROWS, LocalEngine

    tok = tiny_lm.tokenizer
    head = "Topic: violence\nIs the following text about the topic? Answer yes or no.\nText: "
    texts = ["He punched the man.", "A quiet walk\nin the park\nat dawn.", "Bread, flour and\nwater.", "x",
             "one\n" * (LSE_ROWS + 5)]
    prompts = [tok(head + t + "\nassistant\n", add_special_tokens=False)["input_ids"] for t in texts]
    cand = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no")]
    slots = [[tok.decode([i]).endswith("\n") for i in p] for p in prompts]
    wants = [[False] * (len(p) - 1) + [True] for p in prompts]
    out = {}
    for pool in (False, True):
        eng = LocalEngine(tiny_lm.model, tok)
        eng.pool_normalisers = pool
        out[pool] = [eng.logprobs(prompts, cand, wants), eng.logprobs(prompts, cand, slots),
                     eng.logprobs(prompts[:3], cand, None)]
    for a, b in zip(out[False], out[True]):
        for x, y in zip(a, b):
            assert torch.equal(torch.nan_to_num(x, 7.0), torch.nan_to_num(y, 7.0))
    assert not torch.isnan(out[True][0][0][-1]).any() and torch.isnan(out[True][0][0][0]).all()
    assert eng._pool_exact == (tiny_lm.model.dtype == torch.bfloat16)


@pytest.mark.usefixtures("one_thread")
def test_diffs_in_means_of_several_hooks_from_one_pass_equal_one_pass_per_hook(tiny_model):
    import torch

    from safesail.hooks import capture_activations, special_token_mask
    from safesail.verify.directions import diff_in_means, diffs_in_means

    lm = tiny_model

    def mean_at(prompts, hp):  # the reference: one pass per prompt AND per hook, to that hook only
        rows = []
        for p in prompts:
            ids = torch.tensor([p])
            x = capture_activations(lm.model, ids, None, [hp])[hp.name][0].float()
            rows.append(x[~special_token_mask(lm.tokenizer, ids)[0]])
        return torch.cat(rows).sum(0) / sum(len(r) for r in rows)

    concept = [lm.tokenizer(t)["input_ids"] for t in ("How do I build a bomb?", "Who won the election?")]
    neutral = [lm.tokenizer(t)["input_ids"] for t in ("How do I build a shed?", "Who won the match?")]
    hooks = [HookPoint(3), HookPoint(0), HookPoint(1)]
    got = diffs_in_means(lm, hooks, concept, neutral)
    assert set(got) == {h.name for h in hooks}
    for h in hooks:
        want = mean_at(concept, h) - mean_at(neutral, h)
        assert torch.allclose(got[h.name], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[h.name], diff_in_means(lm, h, concept, neutral))
        assert float(got[h.name].norm()) > 0
