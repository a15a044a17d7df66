"""Fixtures shared by the verify tests: a random TopK SAE on the tiny model's layer-1 MLP output."""

from __future__ import annotations

import pytest

from safesail.hooks import HookPoint
from safesail.saes import SAEConfig, build_sae

LAYER = 1


@pytest.fixture(scope="module")
def tiny_topk_sae(tiny_model):
    """(hook point, SAE): TopK k=8 with 4x the tiny model's width at layer 1, frozen."""
    hp = HookPoint(LAYER)
    sae = build_sae(SAEConfig(arch="topk", d_in=tiny_model.hidden_size, n_latents=4 * tiny_model.hidden_size, k=8,
                              hook=hp.name))
    return hp, sae.eval().requires_grad_(False)


@pytest.fixture
def latent3_unit_inputs(tiny_model):
    """(hook point, SteerableSAE with latent 3 at scale 0.05, a one-query violence QuerySet): what a latent unit
    of the tiny model needs; the SAE is built from torch seed 0."""
    import torch

    from safesail.chat import encode_chat
    from safesail.verify.checks import QuerySet
    from safesail.verify.interventions import SteerableSAE

    hp = HookPoint(LAYER)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch="topk", d_in=tiny_model.hidden_size, n_latents=4 * tiny_model.hidden_size, k=8,
                              hook=hp.name))
    enc = [encode_chat(tiny_model.tokenizer, "Name a colour.", None)]
    return hp, SteerableSAE(hp, sae.eval().requires_grad_(False), {3: 0.05}), QuerySet("violence", ["en"], enc, enc)
