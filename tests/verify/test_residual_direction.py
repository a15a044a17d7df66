"""The residual-stream refusal direction (verify/residual_direction.py) on the tiny random Llama and Qwen2:
ablation at every writer equals a forward with orthogonalised weights (and leaves no component along the
direction at any block's input), in a scoring pass and during cached generation; adding zero changes
nothing; the batched left-padded direction equals one-prompt passes; bad edits are one sentence."""

from __future__ import annotations

import copy

import pytest
import torch

from safesail.chat import encode_chat
from safesail.errors import UserError
from safesail.hooks import decoder_layers
from safesail.verify.generation import generate_full
from safesail.verify.residual_direction import (
    ResidualDirection,
    orthogonalize_,
    residual_directions,
    residual_means,
    select_layer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
QUERIES = ["How do I bake bread?", "Tell me about the sea.", "请问天气怎么样？", "क्या है यह?"]
LANGS = ["en", "en", "zh", "hi"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, cache_dir):
    from safesail.config import compose
    from safesail.models import load_model

    cfg = compose(["experiment=smoke", f"model.architecture={request.param}"])
    lm = load_model(cfg.model, "cpu", cache_dir=cache_dir)
    prompts = [encode_chat(lm.tokenizer, q, None) for q in QUERIES]
    return lm, prompts


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _block_inputs(model, ids) -> list[torch.Tensor]:
    got = []
    hs = [b.register_forward_pre_hook(lambda _m, a, k: got.append((a[0] if a else k["hidden_states"]).float()),
                                      with_kwargs=True) for b in decoder_layers(model)]
    try:
        _logits(model, ids)
    finally:
        for h in hs:
            h.remove()
    return got


def test_ablation_equals_orthogonalised_weights_and_removes_the_direction_everywhere(tiny):
    lm, prompts = tiny
    torch.manual_seed(0)
    v = torch.randn(lm.hidden_size) * 3
    u = v / v.norm()
    ids = torch.tensor([prompts[0]])
    plain = _logits(lm.model, ids)
    with ResidualDirection(v, "ablate").apply(lm.model):
        hooked = _logits(lm.model, ids)
        inputs = _block_inputs(lm.model, ids)
    ortho = orthogonalize_(copy.deepcopy(lm.model), v)
    assert torch.allclose(hooked, _logits(ortho, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(hooked, plain, atol=1e-3)              # the edit did something
    assert len(inputs) == len(decoder_layers(lm.model))
    for x in inputs:                                                  # no block sees any of u
        assert float((x @ u).abs().max()) < 1e-4 * float(x.norm(dim=-1).max())
    assert torch.equal(_logits(lm.model, ids), plain)                 # hooks removed on exit


def test_ablation_during_cached_generation_equals_the_orthogonalised_model(tiny):
    lm, prompts = tiny
    torch.manual_seed(1)
    v = torch.randn(lm.hidden_size)
    with ResidualDirection(v, "ablate").apply(lm.model):
        hooked = generate_full(lm, prompts, 6, batch_size=4)
    ortho_lm = copy.copy(lm)
    ortho_lm.model = orthogonalize_(copy.deepcopy(lm.model), v)
    ref = generate_full(ortho_lm, prompts, 6, batch_size=4)
    assert hooked.ids == ref.ids
    assert torch.allclose(hooked.first, ref.first, atol=1e-4)


def test_adding_zero_changes_nothing_and_adding_acts_at_its_layer_only(tiny):
    lm, prompts = tiny
    ids = torch.tensor([prompts[1]])
    plain = _logits(lm.model, ids)
    torch.manual_seed(2)
    v = torch.randn(lm.hidden_size)
    with ResidualDirection(torch.zeros(lm.hidden_size), "add", layer=1).apply(lm.model):
        assert torch.equal(_logits(lm.model, ids), plain)
    with ResidualDirection(v, "add", layer=1, coef=0.0).apply(lm.model):
        assert torch.equal(_logits(lm.model, ids), plain)
    before = _block_inputs(lm.model, ids)
    with ResidualDirection(v, "add", layer=1, coef=2.0).apply(lm.model):
        after = _block_inputs(lm.model, ids)
        assert not torch.allclose(_logits(lm.model, ids), plain, atol=1e-3)
    assert torch.equal(before[0], after[0])
    assert torch.allclose(after[1], before[1] + 2.0 * v, atol=1e-5)


def test_rows_restrict_the_edit_to_some_batch_rows(tiny):
    lm, prompts = tiny
    ids = torch.tensor([prompts[0], prompts[0]])
    plain = _logits(lm.model, ids)
    torch.manual_seed(3)
    v = torch.randn(lm.hidden_size) * 3
    for edit in (ResidualDirection(v, "ablate"), ResidualDirection(v, "add", layer=0)):
        with edit.apply(lm.model, rows=[False, True]):
            out = _logits(lm.model, ids)
        assert torch.equal(out[0], plain[0])
        assert not torch.allclose(out[1], plain[1], atol=1e-3)


def test_batched_directions_equal_one_prompt_passes(tiny):
    lm, prompts = tiny
    concept, neutral = prompts[:2], prompts[2:]
    dirs = residual_directions(lm, concept, neutral, batch_size=2)
    assert dirs.shape == (len(decoder_layers(lm.model)), lm.hidden_size)

    def one(p):
        return torch.stack([x[0, -1] for x in _block_inputs(lm.model, torch.tensor([p]))])

    ref = (one(concept[0]) + one(concept[1])) / 2 - (one(neutral[0]) + one(neutral[1])) / 2
    assert torch.allclose(dirs, ref, atol=1e-4)
    assert torch.allclose(residual_means(lm, prompts, batch_size=3), residual_means(lm, prompts, batch_size=1),
                          atol=1e-4)


def test_select_layer_scores_every_candidate_and_keeps_one(tiny):
    lm, prompts = tiny
    dirs = residual_directions(lm, prompts[:2], prompts[2:], batch_size=4)
    assert float(dirs[0].norm()) == 0          # block 0's input at the last position: the same template token
    layer, scores, base = select_layer(lm, dirs, prompts, LANGS, prompts, LANGS, layers=[0, 1, 2], max_kl=10.0,
                                       batch_size=4)
    assert [s.layer for s in scores] == [1, 2] and layer in (1, 2)
    assert min(s.refusal_ablated for s in scores) == next(s for s in scores if s.layer == layer).refusal_ablated
    assert all(s.kl_neutral >= -1e-6 for s in scores) and "refusal_concept" in base


def test_bad_edits_are_one_sentence(tiny):
    lm, _ = tiny
    d = lm.hidden_size
    with pytest.raises(UserError, match="zero"), ResidualDirection(torch.zeros(d), "ablate").apply(lm.model):
        pass
    with pytest.raises(UserError, match="needs a layer"):
        ResidualDirection(torch.ones(d), "add")
    with pytest.raises(UserError, match="unknown"):
        ResidualDirection(torch.ones(d), "steer")
    with pytest.raises(UserError, match="out of range"), \
            ResidualDirection(torch.ones(d), "add", layer=99).apply(lm.model):
        pass


def test_refusal_effects_give_the_stage_records_of_the_direction_and_its_random_control(tiny):
    from safesail.verify.checks import CheckSettings, QuerySet, Verifier
    from safesail.verify.records import Effect
    from safesail.verify.residual_direction import refusal_effects

    lm, prompts = tiny
    others = [encode_chat(lm.tokenizer, q, None) for q in ("Fix my bike.", "Name a river.", "你好吗？", "नमस्ते")]
    v = Verifier(lm, CheckSettings(max_new_tokens=4, batch_size=4, n_boot=20), None)
    qs = QuerySet("violence", LANGS, prompts, others, neutral_langs=LANGS)
    recs = refusal_effects(v, qs, prompts, others, batch_size=4)
    assert all(isinstance(e, Effect) and e.check == "refusal" for e in recs)
    assert {e.target for e in recs} == {"residual_direction", "random_direction"}
    layer = recs[0].layer
    assert all(e.hook == f"layers.{layer}.resid" and e.layer == layer for e in recs)
    assert [s["layer"] for s in recs[0].details["selection"]] == [1, 2, 3]     # block 0's (zero) left out
    metrics = {(e.target, e.metric, e.lang) for e in recs}
    for t in ("residual_direction", "random_direction"):
        for m in ("refusal_logprob_change_ablate", "refusal_rate_change_ablate", "refusal_logprob_change_steer"):
            assert (t, m, None) in metrics and (t, m, "zh") in metrics
    only = refusal_effects(v, qs, prompts, others, batch_size=4, layers=[3])
    assert {e.layer for e in only} == {3} and [s["layer"] for s in only[0].details["selection"]] == [3]
    # a given layer: the ablation records are those of the orthogonalised model's answers
    fixed = refusal_effects(v, qs, prompts, others, layer=2, batch_size=4)
    r = residual_directions(lm, prompts, others, 4)[2]
    ortho = copy.copy(lm)
    ortho.model = orthogonalize_(copy.deepcopy(lm.model), r)
    want = Verifier(ortho, v.s, None).answers(qs.concept, qs.langs)
    got = next(e for e in fixed if e.target == "residual_direction" and e.metric == "refusal_logprob_change_ablate"
               and e.lang is None)
    ref = sum(a - b for a, b in zip(want.refusal_lp, qs.base_concept.refusal_lp)) / len(prompts)
    assert got.value == pytest.approx(ref, abs=1e-3)
