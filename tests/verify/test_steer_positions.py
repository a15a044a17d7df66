"""Steering only the answer's positions (`positions="answer"`): in a pass over prompts only the last
position is edited, in passes that continue a KV cache (generated tokens, a trie of continuations) every
position is; `all` edits every position; per-row edits (`PerRow`, what generation uses) follow the same rule."""

from __future__ import annotations

import contextlib

import pytest
import torch

from safesail.errors import UserError
from safesail.hooks import hook_module
from safesail.verify.generation import _padded, generate_full
from safesail.verify.interventions import (
    DirectionEdit,
    Intervention,
    PerRow,
    SteerableSAE,
)

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 1          # the block of the tiny_topk_sae fixture (conftest.py)


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_topk_sae):
    lm = tiny_model
    hp, sae = tiny_topk_sae
    v = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    return lm, SteerableSAE(hp, sae, {}), v


def _out(o):
    return o[0] if isinstance(o, tuple) else o


@contextlib.contextmanager
def edits_seen(lm, hp, applied):
    """Per forward pass at `hp`: the edited output minus the unedited one (a hook that runs first records the
    unedited output, one registered after the intervention's hook the edited output)."""
    before, deltas = [], []
    mod = hook_module(lm.model, hp)
    h1 = mod.register_forward_hook(lambda m, i, o: before.append(_out(o).clone()), prepend=True)
    try:
        with applied:
            h2 = mod.register_forward_hook(lambda m, i, o: deltas.append(_out(o) - before[len(deltas)]))
            try:
                yield deltas
            finally:
                h2.remove()
    finally:
        h1.remove()


def _prompt_then_two_tokens(lm, ids, mask):
    from transformers import DynamicCache

    cache = DynamicCache()
    out = lm.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    lm.model(input_ids=torch.cat([nxt, nxt], 1), attention_mask=torch.cat([mask, torch.ones_like(mask[:, :2])], 1),
             cache=cache, use_cache=True)


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_answer_positions_edit_the_prompts_last_position_then_every_generated_token(setup, positions):
    lm, s, v = setup
    ids = torch.tensor([lm.tokenizer("How do I bake bread at home?")["input_ids"]])
    iv = Intervention([s], direction_edits=[DirectionEdit(LAYER, v)], positions=positions)
    with torch.no_grad(), edits_seen(lm, s.hook, iv.apply(lm.model)) as deltas:
        _prompt_then_two_tokens(lm, ids, torch.ones_like(ids))
    prompt, cont = deltas
    if positions == "answer":
        assert torch.count_nonzero(prompt[0, :-1]) == 0
    else:
        assert torch.allclose(prompt[0, :-1], v.expand_as(prompt[0, :-1]), atol=1e-4)
    assert torch.allclose(prompt[0, -1], v, atol=1e-4)
    assert torch.allclose(cont[0], v.expand_as(cont[0]), atol=1e-4)      # a pass that continues a cache: all


def test_per_row_answer_positions(setup):
    """Two left-padded rows, the first under an answer-only edit, the second unmodified (generation's path)."""
    lm, s, v = setup
    prompts = [lm.tokenizer("Tell me about the sea, please.")["input_ids"], lm.tokenizer("Hi")["input_ids"]]
    ids, mask = _padded(prompts, 0, left=True)
    iv = Intervention([s], direction_edits=[DirectionEdit(LAYER, v)], positions="answer")
    with torch.no_grad(), edits_seen(lm, s.hook, PerRow([iv, None]).apply(lm.model)) as deltas:
        _prompt_then_two_tokens(lm, ids, mask)
    prompt, cont = deltas
    assert torch.count_nonzero(prompt[0, :-1]) == 0 and torch.allclose(prompt[0, -1], v, atol=1e-4)
    assert torch.count_nonzero(prompt[1]) == 0 and torch.count_nonzero(cont[1]) == 0
    assert torch.allclose(cont[0], v.expand_as(cont[0]), atol=1e-4)


def test_answer_positions_of_a_zero_vector_change_nothing_and_bad_positions_are_one_sentence(setup):
    lm, s, v = setup
    prompts = [lm.tokenizer("Tell me about the sea.")["input_ids"]]
    zero = Intervention([s], direction_edits=[DirectionEdit(LAYER, torch.zeros_like(v))], positions="answer")
    assert generate_full(lm, prompts, 6, ivs=[zero]).ids == generate_full(lm, prompts, 6).ids
    strong = Intervention([s], direction_edits=[DirectionEdit(LAYER, v * 20)], positions="answer")
    everywhere = Intervention([s], direction_edits=[DirectionEdit(LAYER, v * 20)])
    a, b = generate_full(lm, prompts, 6, ivs=[strong]), generate_full(lm, prompts, 6, ivs=[everywhere])
    assert not torch.allclose(a.first, b.first, atol=1e-4)   # editing the prompt too changes the first answer token
    with pytest.raises(UserError, match="positions"):
        Intervention([s], direction_edits=[DirectionEdit(LAYER, v)], positions="prompt")
