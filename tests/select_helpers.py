"""Helpers for the select tests: synthetic pairs on words the tiny model's tokenizer keeps whole,
and synthetic SAEs (same `.cfg` / `.encode` interface as safesail.saes) with latents
wired to those words.

The tiny model's tokenizer is trained on the bundled corpus, so its vocabulary changes with
the corpus: `choose_words` picks, from the current vocabulary, whole-word tokens whose layer-0
activation a single linear latent can pick out, and uses them as the "concept" words.
"""

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
DOMAIN_ORDER = ("politics", "pornography", "violence", "terror")
_CHOSEN: dict[int, dict[str, tuple[str, str]]] = {}


def _whole_word_tokens(tok) -> list[str]:
    template_ids = set()
    for t in TEMPLATES:
        template_ids |= set(tok(t.format(""), add_special_tokens=False)["input_ids"])
    out = []
    for t in sorted(tok.get_vocab()):
        w = t[1:]
        if t.startswith("\u0120") and w.isascii() and w.isalpha() and w.islower() and len(w) >= 3 \
                and tok.tokenize(" " + w) == [t] and tok.convert_tokens_to_ids(t) not in template_ids:
            out.append(w)
    return out


def choose_words(lm) -> dict[str, tuple[str, str]]:
    """domain -> (concept word, neutral word), picked once per tokenizer from its vocabulary."""
    key = id(lm)
    if key in _CHOSEN:
        return _CHOSEN[key]
    from safesail.hooks import HookPoint
    from safesail.train.pair_activations import capture_pair_activations

    tok = lm.tokenizer
    cands = _whole_word_tokens(tok)[:24]
    assert len(cands) >= 8, f"the tiny tokenizer has too few whole-word tokens: {cands}"
    probe = [Pair(f"w{i}-{j}", "politics", w, "en", t.format(w), t.format(cands[(i + 1) % len(cands)]))
             for i, w in enumerate(cands) for j, t in enumerate(TEMPLATES)]
    pa = capture_pair_activations(lm, probe, [HookPoint(0)], "You are a helpful assistant.")
    acts = pa.acts["layers.0.mlp_out"]
    center = acts.mean(0)
    margins = {}
    for w in cands:
        at = pa.token_ids == tok.convert_tokens_to_ids("\u0120" + w)
        u = acts[at].mean(0) - center
        p = (acts - center) @ (u / u.norm())
        margins[w] = float(p[at].min() - p[~at].max())
    ranked = sorted(cands, key=lambda w: -margins[w])
    concepts, rest = ranked[:4], ranked[4:]
    assert margins[concepts[-1]] > 0, f"no 4 separable whole-word tokens: {margins}"
    neutrals = rest[-4:]
    _CHOSEN[key] = {d: (c, n) for d, c, n in zip(DOMAIN_ORDER, concepts, neutrals)}
    return _CHOSEN[key]


def synthetic_pairs(words: dict[str, tuple[str, str]]) -> list[Pair]:
    out = []
    for d, (c, n) in words.items():
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


def save_as_sae_folder(synth: SyntheticSAE, folder: Path, metrics: dict | None = None, l1_coef: float = 0.05) -> Path:
    """Write a synthetic SAE as a real ReLU SAE folder (cfg.json + sae.safetensors + metrics.json)."""
    from safesail.saes import SAEConfig, build_sae, save_sae

    cfg = SAEConfig(arch="relu", d_in=synth.cfg.d_in, n_latents=synth.cfg.n_latents, l1_coef=l1_coef,
                    hook=synth.cfg.hook, model=synth.cfg.model)
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(synth.W)
        sae.b_enc.copy_(synth.b)
        sae.b_dec.copy_(synth.center)
        sae.W_dec.copy_(synth.W)
    return save_sae(sae, folder, metrics if metrics is not None else
                    {"fvu": 0.2, "l0": 10.0, "dead_fraction": 0.0, "ce_loss_recovered": 0.9})
