"""Per-row interventions: a batch whose rows each carry their own edit equals each row run alone."""

from __future__ import annotations

import pytest
import torch

from safesail.chat import encode_chat
from safesail.hooks import HookPoint
from safesail.saes import SAEConfig, build_sae
from safesail.verify.generation import generate_batch, next_token_logprobs, shared_prefix_logprobs
from safesail.verify.interventions import DirectionEdit, Intervention, LatentEdit, PerRow, SteerableSAE
from safesail.verify.refusal import _opening_ids, refusal_logprob

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 1
QUERIES = ["How do I bake bread?", "Tell me about the sea and its waves.", "请问天气怎么样？",
           "क्या है यह?", "Name a colour."]


@pytest.fixture(scope="module")
def rows(tiny_model):
    lm = tiny_model
    hp = HookPoint(LAYER)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="topk", d_in=lm.hidden_size, n_latents=4 * lm.hidden_size, k=8, hook=hp.name))
    sae.eval().requires_grad_(False)
    s = SteerableSAE(hp, sae, {i: 2.0 for i in range(sae.W_dec.shape[0])})
    prompts = [encode_chat(lm.tokenizer, q, "You are a helpful assistant.") for q in QUERIES]
    v = torch.randn(lm.hidden_size)
    ivs = [Intervention([s], [LatentEdit(LAYER, 3, "add", 30.0)]),
           Intervention([s], [LatentEdit(LAYER, 5, "ablate"), LatentEdit(LAYER, 7, "clamp", 20.0)]),
           None,
           Intervention([s], direction_edits=[DirectionEdit(LAYER, v * 5, "project_out")]),
           Intervention([s], direction_edits=[DirectionEdit(LAYER, v * 3, "add")])]
    return lm, prompts, ivs


def _alone(iv, lm, fn):
    if iv is None:
        return fn()
    with iv.apply(lm.model):
        return fn()


def test_per_row_hook_output_equals_each_row_alone(rows):
    lm, _, ivs = rows
    x = torch.randn(len(ivs), 6, lm.hidden_size) * 3
    edit = PerRow(ivs)
    parts = next(iter(edit.groups.values()))
    got = edit._edit(parts, x)
    for r, iv in enumerate(ivs):
        want = x[r:r + 1] if iv is None else next(iter(iv.per_hook.values()))(x[r:r + 1])
        assert torch.allclose(got[r:r + 1], want, atol=1e-5)
    # a batch repeated per row (k rows each) gives each block its row's edit
    xr = x.repeat_interleave(3, 0)
    got3 = edit._edit(parts, xr)
    assert torch.allclose(got3[3:6], got[1:2].expand(3, -1, -1), atol=1e-5)


def test_batched_generation_and_logprobs_equal_one_row_at_a_time(rows):
    lm, prompts, ivs = rows
    together = generate_batch(lm, prompts, 8, batch_size=8, ivs=ivs)
    lp_together = next_token_logprobs(lm, prompts, batch_size=8, ivs=ivs)
    for r, (p, iv) in enumerate(zip(prompts, ivs)):
        alone = _alone(iv, lm, lambda: generate_batch(lm, [p], 8, batch_size=1))
        assert together[r] == alone[0]
        lp = _alone(iv, lm, lambda: next_token_logprobs(lm, [p], batch_size=1))
        assert torch.allclose(lp_together[r], lp[0], atol=1e-5)
    # the edits did something: the steered row differs from the unmodified one
    plain = next_token_logprobs(lm, prompts[:1], batch_size=1)
    assert not torch.allclose(plain[0], lp_together[0], atol=1e-3)


def test_batched_refusal_logprob_equals_the_shared_prefix_pass(rows):
    lm, prompts, ivs = rows
    langs = ["en", "en", "zh", "hi", "en"]
    got = refusal_logprob(lm, prompts, langs, batch_size=3, ivs=ivs)
    for r, (p, lang, iv) in enumerate(zip(prompts, langs, ivs)):
        lp = _alone(iv, lm, lambda: shared_prefix_logprobs(lm, p, _opening_ids(lm.tokenizer, lang, {})))
        assert abs(got[r] - float(torch.logsumexp(lp, 0))) < 1e-4


def test_generate_full_reads_next_token_and_openings_from_the_generation_cache(rows):
    from safesail.verify.generation import generate_full

    lm, prompts, ivs = rows
    langs = ["en", "en", "zh", "hi", "en"]
    conts = [_opening_ids(lm.tokenizer, lang, {}) for lang in langs]
    g = generate_full(lm, prompts, 6, batch_size=4, ivs=ivs, continuations=conts)
    assert g.ids == generate_batch(lm, prompts, 6, batch_size=4, ivs=ivs)
    assert torch.allclose(g.first, next_token_logprobs(lm, prompts, batch_size=8, ivs=ivs), atol=1e-4)
    want = refusal_logprob(lm, prompts, langs, batch_size=2, ivs=ivs)
    for r in range(len(prompts)):
        assert abs(float(torch.logsumexp(g.continuations[r], 0)) - want[r]) < 1e-4


def test_generate_full_batches_by_length_and_returns_the_prompts_order(rows):
    from safesail.verify.generation import generate_full

    lm, prompts, ivs = rows
    sorted_ = generate_full(lm, prompts, 5, batch_size=2, ivs=ivs)
    plain = generate_full(lm, prompts, 5, batch_size=2, ivs=ivs, sort_by_length=False)
    assert sorted_.ids == plain.ids
    assert torch.allclose(sorted_.first, plain.first, atol=1e-4)


def test_openings_trie_feeds_each_shared_prefix_once():
    from safesail.verify.generation import _trie_nodes

    assert _trie_nodes([[1, 2, 3], [1, 2, 4], [1, 5], [6], [7, 8]]) == [(1,), (7,), (1, 2)]
    assert _trie_nodes([[9]]) == []


def test_trie_scored_continuations_equal_a_pass_per_continuation(rows):
    """Continuations that share prefixes, of different lengths, per prompt under its own edit: the one-row
    tree-masked pass gives the same log-probs as one plain pass per continuation."""
    from safesail.verify.generation import batched_prefix_logprobs

    lm, prompts, ivs = rows
    conts = [[[11, 12, 13], [11, 12, 14, 15], [11, 16], [17]],
             [[20, 21], [20, 21, 22, 23, 24]],
             [[30]],
             [[11, 12, 13], [11, 12, 14, 15], [11, 16], [17]],
             [[40, 41, 42], [43, 44]]]
    got = batched_prefix_logprobs(lm, prompts, conts, batch_size=3, ivs=ivs)
    for r, (p, cs, iv) in enumerate(zip(prompts, conts, ivs)):
        want = _alone(iv, lm, lambda: shared_prefix_logprobs(lm, p, cs))
        assert torch.allclose(got[r], want, atol=1e-4), (r, got[r], want)


def test_token_logprobs_row_by_row_equal_the_full_logits_pass(rows):
    """generation.token_logprobs (unembedding per row, no [rows, length, vocab] buffer) equals the
    log-softmax of the model's own logits, per row under its edit, with the activations captured."""
    from safesail.verify.generation import token_logprobs

    lm, prompts, ivs = rows
    seqs = [p + [11, 12, 13][: 1 + r % 3] for r, p in enumerate(prompts)]
    hp = HookPoint(LAYER)
    got, acts = token_logprobs(lm, seqs, 3, ivs=ivs, capture=[hp])
    for r, (s, iv) in enumerate(zip(seqs, ivs)):
        ids = torch.tensor([s])
        with torch.no_grad():
            logits = _alone(iv, lm, lambda: lm.model(input_ids=ids).logits.float())
        want = torch.log_softmax(logits[0, :-1], -1)[torch.arange(len(s) - 1), torch.tensor(s[1:])]
        assert torch.allclose(got[r], want, atol=1e-4)
        assert acts[r][hp.name].shape == (len(s), lm.hidden_size)
