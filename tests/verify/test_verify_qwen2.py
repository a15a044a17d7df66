"""Verify's batched generation, refusal openings and edits on a Qwen2 block (the second source model of
issue 15, Qwen2.5-Coder-0.5B-Instruct, is a Qwen2: biased q/k/v projections, tied embeddings), checked on
the tiny random Qwen2 against plain one-row forward passes computed here."""

from __future__ import annotations

import pytest
import torch

from safesail.chat import encode_chat
from safesail.hooks import HookPoint, capture_activations
from safesail.saes import SAEConfig, build_sae
from safesail.verify.generation import generate_full
from safesail.verify.interventions import (
    DirectionEdit,
    Intervention,
    LatentEdit,
    SteerableSAE,
)
from safesail.verify.refusal import _opening_ids

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 2
QUERIES = ["How do I bake bread?", "Tell me about the sea.", "请问天气怎么样？", "क्या है यह?"]
LANGS = ["en", "en", "zh", "hi"]


@pytest.fixture(scope="module")
def qwen2(cache_dir):
    from safesail.config import compose
    from safesail.models import load_model

    cfg = compose(["experiment=smoke", "model.architecture=qwen2"])
    lm = load_model(cfg.model, "cpu", cache_dir=cache_dir)
    assert type(lm.model).__name__ == "Qwen2ForCausalLM"
    torch.manual_seed(0)
    hp = HookPoint(LAYER)
    sae = build_sae(SAEConfig(arch="topk", d_in=lm.hidden_size, n_latents=4 * lm.hidden_size, k=8, hook=hp.name))
    sae.eval().requires_grad_(False)
    s = SteerableSAE(hp, sae, {i: 2.0 for i in range(sae.W_dec.shape[0])})
    prompts = [encode_chat(lm.tokenizer, q, None) for q in QUERIES]
    return lm, s, prompts


def _plain_logprob(lm, prompt: list[int], cont: list[int], iv) -> float:
    """log P(cont | prompt) from one full forward pass of prompt + cont, under `iv`."""
    ids = torch.tensor([prompt + cont])
    with torch.no_grad(), (iv.apply(lm.model) if iv is not None else torch.no_grad()):
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(cont))
    return float(logp[pos, torch.tensor(cont)].sum())


def test_generation_with_per_row_edits_and_refusal_openings_equal_plain_passes_on_qwen2(qwen2):
    lm, s, prompts = qwen2
    v = torch.randn(lm.hidden_size)
    ivs = [Intervention([s], [LatentEdit(LAYER, 3, "add", 30.0)]), None,
           Intervention([s], direction_edits=[DirectionEdit(LAYER, v * 4, "project_out")]),
           Intervention([s], direction_edits=[DirectionEdit(LAYER, v * 3, "add")])]
    conts = [_opening_ids(lm.tokenizer, lang, {}) for lang in LANGS]
    g = generate_full(lm, prompts, 6, batch_size=4, ivs=ivs, continuations=conts)   # left-padded, one batch
    for r, (p, iv) in enumerate(zip(prompts, ivs)):
        alone = generate_full(lm, [p], 6, batch_size=1, ivs=[iv])
        assert g.ids[r] == alone.ids[0]
        ids = torch.tensor([p])
        with torch.no_grad(), (iv.apply(lm.model) if iv is not None else torch.no_grad()):
            want_first = torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].float(), -1)
        assert torch.allclose(g.first[r], want_first, atol=1e-4)
        # every refusal opening scored from the generation's cache (trie under a tree mask) = a plain pass
        want = torch.tensor([_plain_logprob(lm, p, c, iv) for c in conts[r]])
        assert torch.allclose(g.continuations[r], want, atol=1e-3), (r, g.continuations[r], want)
    # the edits did something on this architecture
    assert not torch.allclose(g.first[0], generate_full(lm, prompts[:1], 1, 1).first[0], atol=1e-3)


def test_ablating_an_inactive_latent_leaves_the_qwen2_forward_unchanged(qwen2):
    lm, s, prompts = qwen2
    ids = torch.tensor([prompts[0]])
    x = capture_activations(lm.model, ids, None, [s.hook])[s.hook.name][0]
    z = s.sae.encode(x.to(s.sae.W_dec.dtype))
    dead = int((z > 0).sum(0).argmin())
    assert not bool((z[:, dead] > 0).any())
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        with Intervention([s], [LatentEdit(LAYER, dead, "ablate")]).apply(lm.model):
            abl = lm.model(input_ids=ids).logits
        with Intervention([s], [LatentEdit(LAYER, dead, "add", 0.0)]).apply(lm.model):
            zero = lm.model(input_ids=ids).logits
    assert torch.equal(plain, abl) and torch.equal(plain, zero)
