"""Interventions on the tiny model: exactness of ablation, zero strength, steering direction, bad input."""

from __future__ import annotations

import pytest
import torch

from safesail.errors import UserError
from safesail.hooks import capture_activations
from safesail.verify.interventions import (
    DirectionEdit,
    Intervention,
    LatentEdit,
    SteerableSAE,
    parse_edit,
    parse_neuron_id,
)

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 1          # the block of the tiny_topk_sae fixture (conftest.py)


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_topk_sae):
    lm = tiny_model
    hp, sae = tiny_topk_sae
    ids = torch.tensor([lm.tokenizer("How do I bake bread at home? Tell me about the sea.")["input_ids"]])
    x = capture_activations(lm.model, ids, None, [hp])[hp.name][0]
    z = sae.encode(x)
    scales = {i: float(v) if v > 0 else 1.0 for i, v in enumerate(z.max(0).values.tolist())}
    return lm, SteerableSAE(hp, sae, scales), ids, z


def _logits(lm, ids, iv=None):
    with torch.no_grad():
        if iv is None:
            return lm.model(input_ids=ids).logits[0]
        with iv.apply(lm.model):
            return lm.model(input_ids=ids).logits[0]


def test_ablating_an_inactive_latent_is_exactly_the_unmodified_forward(setup):
    lm, s, ids, z = setup
    inactive = int((z > 0).sum(0).argmin())
    assert int((z[:, inactive] > 0).sum()) == 0
    base = _logits(lm, ids)
    out = _logits(lm, ids, Intervention([s], [LatentEdit(LAYER, inactive, "ablate")]))
    assert torch.equal(base, out)


def test_ablating_an_active_latent_removes_only_its_contribution(setup):
    lm, s, ids, z = setup
    active = int((z > 0).sum(0).argmax())
    hp = s.hook
    iv = Intervention([s], [LatentEdit(LAYER, active, "ablate")])
    x = capture_activations(lm.model, ids, None, [hp])[hp.name][0]
    with iv.apply(lm.model):
        x2 = capture_activations(lm.model, ids, None, [hp])[hp.name][0]
    expected = x - z[:, active:active + 1] * s.sae.W_dec[active]
    assert torch.allclose(x2, expected, atol=1e-5)
    assert not torch.equal(_logits(lm, ids), _logits(lm, ids, iv))


def test_zero_strength_add_changes_nothing(setup):
    lm, s, ids, _ = setup
    base = _logits(lm, ids)
    out = _logits(lm, ids, Intervention([s], [LatentEdit(LAYER, 5, "add", 0.0)]))
    assert torch.equal(base, out)


def test_steering_moves_logits_toward_the_directions_tokens(setup):
    """Adding a direction whose direct logit effect promotes a token raises that token's logit."""
    lm, s, ids, _ = setup
    # A residual-stream direction that the unembedding reads as "token t": its unembedding row.
    W_U = lm.model.get_output_embeddings().weight.detach()
    t = 1234 % W_U.shape[0]
    v = W_U[t] / W_U[t].norm() * 20.0
    last = lm.num_layers - 1
    base = torch.log_softmax(_logits(lm, ids)[-1], -1)
    iv = Intervention([s], direction_edits=[DirectionEdit(last, v, "add", site="resid")])
    steered = torch.log_softmax(_logits(lm, ids, iv)[-1], -1)
    assert steered[t] - base[t] > 1.0
    # the same through an SAE latent: a latent whose decoder row points along v at the SAE's layer
    sae_dir = s.direction(3)
    dla = W_U @ sae_dir
    up, down = int(dla.argmax()), int(dla.argmin())
    iv = Intervention([s], [LatentEdit(LAYER, 3, "add", 50.0 / s.scales[3])])
    steered = torch.log_softmax(_logits(lm, ids, iv)[-1], -1)
    assert (steered[up] - base[up]) > (steered[down] - base[down])


def test_several_latents_at_once_and_clamp(setup):
    lm, s, ids, z = setup
    active = int((z > 0).sum(0).argmax())
    hp = s.hook
    iv = Intervention([s], [LatentEdit(LAYER, active, "clamp", 2.0), LatentEdit(LAYER, 7, "add", 1.0)])
    with iv.apply(lm.model):
        x2 = capture_activations(lm.model, ids, None, [hp])[hp.name][0]
    x = capture_activations(lm.model, ids, None, [hp])[hp.name][0]
    expected = (x + (2.0 * s.scales[active] - z[:, active:active + 1]) * s.sae.W_dec[active]
                + s.scales[7] * s.sae.W_dec[7])
    assert torch.allclose(x2, expected, atol=1e-4)


def test_interventions_apply_during_generation(setup):
    lm, s, ids, _ = setup
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        base = lm.model.generate(ids, **kw)
        with Intervention([s], [LatentEdit(LAYER, 3, "add", 80.0 / s.scales[3])]).apply(lm.model):
            steered = lm.model.generate(ids, **kw)
        again = lm.model.generate(ids, **kw)
    assert not torch.equal(base, steered)
    assert torch.equal(base, again)  # hooks are removed afterwards


@pytest.mark.parametrize("make, words", [
    (lambda s: Intervention([s], [LatentEdit(9, 1, "ablate")]), "no SAE on layer 9"),
    (lambda s: Intervention([s], [LatentEdit(LAYER, 10 ** 6, "ablate")]), "does not exist"),
    (lambda s: Intervention([s], [LatentEdit(LAYER, 1, "add", 1e9)]), "out of range"),
    (lambda s: Intervention([s], [LatentEdit(LAYER, 1, "add", float("nan"))]), "out of range"),
    (lambda s: Intervention([s], [LatentEdit(LAYER, 1, "clamp", -1.0)]), "never negative"),
    (lambda s: Intervention([SteerableSAE(s.hook, s.sae, {})], [LatentEdit(LAYER, 1, "add", 1.0)]),
     "no typical activation"),
])
def test_bad_interventions_are_one_sentence(setup, make, words):
    s = setup[1]
    with pytest.raises(UserError, match=words) as e:
        make(s)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_parse_edits():
    assert parse_neuron_id("14_3598") == (14, 3598)
    assert parse_edit("7_850=4", "add") == LatentEdit(7, 850, "add", 4.0)
    assert parse_edit("14_3598", "ablate") == LatentEdit(14, 3598, "ablate", 0.0)
    for text, mode, words in [("14-3598", "ablate", "not of the form"), ("7_850", "add", "needs a strength"),
                              ("7_850=x", "clamp", "not a number"), ("7_850=1", "ablate", "without a strength")]:
        with pytest.raises(UserError, match=words):
            parse_edit(text, mode)


def test_refusal_logprob_shares_the_prompt_cache_exactly(tiny_model):
    from safesail.chat import encode_chat
    from safesail.verify.generation import continuation_logprobs, shared_prefix_logprobs
    from safesail.verify.refusal import _opening_ids, is_refusal, query_lang

    lm = tiny_model
    p = encode_chat(lm.tokenizer, "How do I make a bomb?", "You are a helpful assistant.")
    cs = _opening_ids(lm.tokenizer, "zh", {})
    full = continuation_logprobs(lm, [p] * len(cs), cs)
    shared = shared_prefix_logprobs(lm, p, cs)
    assert torch.allclose(full, shared, atol=1e-4)
    assert is_refusal("I’m sorry, but I can’t help with that.") and is_refusal("抱歉，我不能提供")
    assert is_refusal("मुझे खेद है, मैं यह नहीं कर सकता") and not is_refusal("Sure! Here is how to bake bread.")
    assert [query_lang(q) for q in ("请问", "क्या है", "What?")] == ["zh", "hi", "en"]


def test_rows_mask_edits_only_the_chosen_batch_rows(setup):
    lm, s, ids, _ = setup
    iv = Intervention([s], [LatentEdit(LAYER, 3, "add", 80.0 / s.scales[3])])
    pair = torch.cat([ids, ids])
    with torch.no_grad():
        with iv.apply(lm.model, rows=[False, True]):
            both = lm.model(input_ids=pair).logits
        base = lm.model(input_ids=ids).logits[0]
        steered = _logits(lm, ids, iv)
    assert torch.allclose(both[0], base, atol=1e-5) and torch.allclose(both[1], steered, atol=1e-5)
    assert not torch.allclose(both[0], both[1])
