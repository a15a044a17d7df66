"""Helpers for the select tests: synthetic pairs on words the tiny model's tokenizer keeps whole,
and synthetic SAEs (same `.cfg` / `.encode` interface as safesail.train.saes) with latents
wired to those words."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from safesail.train.pairs import Pair

TEMPLATES = ["Why did the report mention the {}?", "Tell me about the {} in the story.",
             "Is the {} common in this town?", "What does the word {} mean?",
             "My friend asked about the {} yesterday.", "Where did you read about the {}?"]
# domain -> (concept word, neutral word); each concept word is one token of the tiny tokenizer.
WORDS = {"politics": ("French", "plain"), "pornography": ("bread", "paper"),
         "violence": ("dog", "cup"), "terror": ("fox", "cat")}


def synthetic_pairs() -> list[Pair]:
    out = []
    for d, (c, n) in WORDS.items():
        for i, t in enumerate(TEMPLATES):
            out.append(Pair(f"{d}-{i}", d, c, "en", t.format(c), t.format(n)))
    return out


def write_pairs(path: Path, pairs: list[Pair]) -> Path:
    path.write_text("".join(json.dumps(p.__dict__) + "\n" for p in pairs), encoding="utf-8")
    return path


@dataclass
class SynthCfg:
    arch: str
    d_in: int
    n_latents: int
    k: int | None
    hook: str
    model: str


class SyntheticSAE(nn.Module):
    """codes = relu((x - center) @ W.T + b): nonnegative, in the activation scale."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, center: torch.Tensor, hook: str, model: str):
        super().__init__()
        self.W = nn.Parameter(W.clone(), requires_grad=False)
        self.b = nn.Parameter(b.clone(), requires_grad=False)
        self.center = nn.Parameter(center.clone(), requires_grad=False)
        self.cfg = SynthCfg("synthetic", W.shape[1], W.shape[0], None, hook, model)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.center) @ self.W.T + self.b)


def random_sae(d_in: int, n_latents: int, hook: str, model: str, seed: int, center=None) -> SyntheticSAE:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_latents, d_in, generator=g) / d_in ** 0.5
    center = torch.zeros(d_in) if center is None else center
    return SyntheticSAE(W, torch.zeros(n_latents), center, hook, model)


def wired_sae(acts: torch.Tensor, token_ids: torch.Tensor, wires: dict[int, int], n_latents: int,
              hook: str, model: str, seed: int) -> SyntheticSAE:
    """A random SAE whose latent j (for each j -> token id in `wires`) fires exactly on that token.

    The encoder row is the direction from the mean activation to the token's mean activation;
    the bias puts the threshold halfway between the token's lowest projection and the highest
    projection of any other token (asserted to be separable).
    """
    center = acts.mean(0)
    sae = random_sae(acts.shape[1], n_latents, hook, model, seed, center)
    W, b = sae.W.data, sae.b.data
    for j, tid in wires.items():
        at = token_ids == tid
        assert int(at.sum()) > 0, f"token {tid} never occurs"
        u = acts[at].mean(0) - center
        u = u / u.norm()
        p = (acts - center) @ u
        lo, hi = float(p[at].min()), float(p[~at].max())
        assert lo > hi, f"token {tid} is not linearly separable here ({lo:.3f} <= {hi:.3f})"
        W[j] = u
        b[j] = -(lo + hi) / 2
    return sae
