"""A refusal direction of the residual stream, removed at every layer or added at one (Arditi et al. 2024,
"Refusal in language models is mediated by a single direction"): the published intervention, beside
verify's per-hook edits (`interventions.py`, which edit one block's MLP output).

- **The direction.** For every block l, the mean residual stream at the block's input at the last prompt
  position (the one that predicts the first answer token) over concept prompts minus the same mean over
  neutral prompts (`residual_directions`: [layers, d]; the input of block 0 is the embedding).
- **Ablation** (`ResidualDirection(v, mode="ablate")`): `x <- x - (x.u) u`, `u = v/|v|`, on the output of
  every module that writes into the residual stream (the token embedding, every block's attention and
  MLP), so no residual activation at any layer or position has a component along u. It is a linear edit
  of those outputs, so it equals running the model with orthogonalised weights (`orthogonalize_`: the
  embedding's rows and the attention / MLP output projections' columns made orthogonal to u; tested).
- **Addition** (`mode="add"`): `x <- x + coef * v` at the input of block `layer`, at every position.
- **The layer** (`select_layer`): per candidate layer, its direction is ablated everywhere and the refusal
  score (`refusal.refusal_logprob`, the log-probability of a refusal opening) of held-out concept prompts
  is read, with the KL of the next-token distribution on neutral prompts (what the edit costs where
  there is nothing to refuse) and the refusal score of neutral prompts with the direction added; the
  layer kept is the one whose ablation lowers refusal most among those with KL <= `max_kl` in the first
  `max_depth` of the model (the paper: KL < 0.1, layers < 0.8 L).

Both edits apply to every forward pass inside `with edit.apply(model):`, generation with a KV cache
(prompt and generated tokens) as well as a scoring pass; `rows` restricts them to some batch rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from safesail.errors import UserError
from safesail.hooks import decoder_layers

MODES = ("ablate", "add")
log = logging.getLogger(__name__)


def _writers(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are added into the residual stream: the embedding, each block's attention
    and MLP (Llama / Qwen2 / Mistral blocks)."""
    out = [model.get_input_embeddings()]
    for k, block in enumerate(decoder_layers(model)):
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None:
            raise UserError(f"block {k} of {type(model).__name__} has no self_attn / mlp; the residual-direction "
                            "ablation supports Llama-, Qwen2- and Mistral-style blocks.")
        out += [attn, mlp]
    return out


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = float(v.norm())
    if not math.isfinite(n) or n == 0:
        raise UserError("the residual direction is zero (or not finite); it has no direction to ablate or add: "
                        "compute it from prompts that differ.")
    return v.detach().float() / n


@dataclass
class ResidualDirection:
    """One residual-stream edit: ablate `vector`'s direction everywhere, or add `coef * vector` at block `layer`."""

    vector: torch.Tensor      # [d]
    mode: str = "ablate"      # ablate | add
    layer: int | None = None  # add: the block at whose input the vector is added
    coef: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"unknown residual-direction edit {self.mode!r}; use ablate or add.")
        if self.mode == "add" and self.layer is None:
            raise UserError("adding a residual direction needs a layer (the block at whose input it is added).")
        if not math.isfinite(float(self.coef)):
            raise UserError(f"the coefficient {self.coef} of the residual direction is not a finite number.")

    def _mask(self, rows, x: torch.Tensor) -> torch.Tensor | None:
        if rows is None or x.dim() < 3:
            return None
        return rows.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))

    @contextlib.contextmanager
    def apply(self, model: nn.Module, rows: Sequence[bool] | None = None):
        """Edit every forward pass of `model` inside the block; `rows`: only these batch rows."""
        mask = None if rows is None else torch.tensor([bool(r) for r in rows])
        handles = []
        blocks = decoder_layers(model)
        if self.mode == "ablate":
            u = _unit(self.vector)

            def project(x: torch.Tensor) -> torch.Tensor:
                uu = u.to(device=x.device, dtype=x.dtype)
                delta = (x @ uu).unsqueeze(-1) * uu
                keep = self._mask(mask, x)
                return x - (delta if keep is None else delta * keep)

            def hook(_module, _inputs, output):
                if isinstance(output, (tuple, list)):
                    return (project(output[0]), *output[1:])
                return project(output)

            targets = _writers(model)
            try:
                handles = [m.register_forward_hook(hook) for m in targets]
                yield self
            finally:
                for h in handles:
                    h.remove()
            return
        if not 0 <= int(self.layer) < len(blocks):
            raise UserError(f"layer {self.layer} is out of range: the model has {len(blocks)} blocks "
                            f"(0..{len(blocks) - 1}).")
        v = self.vector.detach().float() * float(self.coef)

        def pre(_module, args, kwargs):
            if args:
                x = args[0]
            else:
                x = kwargs["hidden_states"]
            add = v.to(device=x.device, dtype=x.dtype).expand_as(x)
            keep = self._mask(mask, x)
            x = x + (add if keep is None else add * keep)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        try:
            handles = [blocks[int(self.layer)].register_forward_pre_hook(pre, with_kwargs=True)]
            yield self
        finally:
            for h in handles:
                h.remove()


@torch.no_grad()
def orthogonalize_(model: nn.Module, vector: torch.Tensor) -> nn.Module:
    """Edit `model`'s weights in place so that nothing it writes into the residual stream has a component
    along `vector` (the weight form of `ResidualDirection(vector, "ablate")`); an output embedding tied to
    the input embedding is untied first, so the unembedding stays as it was."""
    u = _unit(vector)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    w = emb.weight
    uu = u.to(w.dtype)
    w -= (w @ uu).unsqueeze(1) * uu
    for block in decoder_layers(model):
        for lin in (block.self_attn.o_proj, block.mlp.down_proj):
            w = lin.weight                                  # [d, d_in]: output = W x
            uu = u.to(w.dtype)
            w -= uu.unsqueeze(1) * (uu @ w).unsqueeze(0)
            if getattr(lin, "bias", None) is not None:
                lin.bias -= (lin.bias @ uu) * uu
    return model


@torch.no_grad()
def residual_means(lm, prompts: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """[blocks, d] float32: the mean over prompts of each block's input at the prompt's last position
    (left-padded batches; the pass stops after the last block, no unembedding)."""
    from safesail.verify.generation import _pad_id, _padded

    if not prompts:
        raise UserError("no prompts to compute a residual direction from; check the pairs and languages.")
    blocks = decoder_layers(lm.model)
    got: dict[int, torch.Tensor] = {}

    class _Stop(Exception):
        pass

    def make(k: int):
        def pre(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            got[k] = x[:, -1].float().cpu()
            if k == len(blocks) - 1:
                raise _Stop
        return pre

    total = torch.zeros(len(blocks), lm.hidden_size)
    handles = [b.register_forward_pre_hook(make(k), with_kwargs=True) for k, b in enumerate(blocks)]
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask = _padded(prompts[i:i + batch_size], _pad_id(lm), left=True)
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            got.clear()
            try:
                lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                         position_ids=pos.to(lm.device), use_cache=False)
            except _Stop:
                pass
            total += torch.stack([got[k].sum(0) for k in range(len(blocks))])
    finally:
        for h in handles:
            h.remove()
    return total / len(prompts)


def residual_directions(lm, concept: list[list[int]], neutral: list[list[int]],
                        batch_size: int = 16) -> torch.Tensor:
    """[blocks, d]: per block, the mean residual input at the last prompt position over `concept` prompts
    minus over `neutral` prompts (the candidate refusal directions, one per layer)."""
    return residual_means(lm, concept, batch_size) - residual_means(lm, neutral, batch_size)


@dataclass
class LayerScore:
    layer: int
    norm: float               # |r_l|
    refusal_ablated: float    # mean refusal log-prob of the concept prompts, r_l ablated everywhere
    kl_neutral: float         # mean KL(unedited || ablated) of the next-token distribution, neutral prompts
    refusal_added: float      # mean refusal log-prob of the neutral prompts, r_l added at block l


def select_layer(lm, dirs: torch.Tensor, concept: list[list[int]], clangs: list[str],
                 neutral: list[list[int]], nlangs: list[str], layers: Sequence[int] | None = None,
                 max_kl: float = 0.1, max_depth: float = 0.8, batch_size: int = 16,
                 ) -> tuple[int, list[LayerScore], dict]:
    """The layer whose direction, ablated everywhere, most lowers the refusal log-prob of `concept`
    among the candidates whose KL on `neutral` is at most `max_kl` (all candidates when none is);
    candidates: `layers`, default every block in the first `max_depth` of the model (a zero direction is
    skipped)."""
    from safesail.verify.generation import next_token_logprobs
    from safesail.verify.refusal import refusal_logprob

    n = dirs.shape[0]
    layers = [k for k in range(n) if k < max_depth * n] if layers is None else [int(k) for k in layers]
    # block 0's input at the last position is the embedding of the same template token for every prompt
    layers = [k for k in layers if float(dirs[k].norm()) > 0]
    if not layers:
        raise UserError("no candidate layers for the residual direction; widen max_depth or list layers.")
    memo: dict = {}
    base_c = refusal_logprob(lm, concept, clangs, memo, batch_size)
    base_n = refusal_logprob(lm, neutral, nlangs, memo, batch_size)
    base_next = next_token_logprobs(lm, neutral, batch_size)
    mean = lambda xs: sum(xs) / len(xs)
    scores = []
    for k in layers:
        with ResidualDirection(dirs[k], "ablate").apply(lm.model):
            rc = refusal_logprob(lm, concept, clangs, memo, batch_size)
            nxt = next_token_logprobs(lm, neutral, batch_size)
        kl = float((base_next.exp() * (base_next - nxt)).sum(-1).mean())
        with ResidualDirection(dirs[k], "add", layer=k).apply(lm.model):
            rn = refusal_logprob(lm, neutral, nlangs, memo, batch_size)
        scores.append(LayerScore(k, float(dirs[k].norm()), mean(rc), kl, mean(rn)))
        log.info("residual direction, layer %d: refusal ablated %.3f (unedited %.3f), KL %.4f, neutral added %.3f "
                 "(unedited %.3f)", k, mean(rc), mean(base_c), kl, mean(rn), mean(base_n))
    ok = [s for s in scores if s.kl_neutral <= max_kl] or scores
    best = min(ok, key=lambda s: s.refusal_ablated)
    return best.layer, scores, {"refusal_concept": mean(base_c), "refusal_neutral": mean(base_n)}


# ---- as a verify unit: one domain's refusal records ------------------------------------------------------

TARGET, CONTROL_TARGET = "residual_direction", "random_direction"


def refusal_effects(v, qs, ref_concept: list[list[int]], ref_neutral: list[list[int]], layer: int | None = None,
                    coef: float = 1.0, max_kl: float = 0.1, seed: int = 0, batch_size: int = 16,
                    layers: Sequence[int] | None = None) -> list:
    """The refusal records of one domain's residual direction, for `safesail verify` (`v`: its Verifier, `qs`:
    the domain's QuerySet with its unmodified answers): the direction from the first half of the held-out
    reference pairs, its layer chosen on the second half (`select_layer`; or `layer`), then ablated at
    every layer on the concept queries (`refusal_*_change_ablate`) and added at its layer on the neutral
    queries (`refusal_*_change_steer`); `layers`: the candidate layers (default: every block in the first 80%,
    three passes over half the reference pairs each); a seeded random direction of the same norm beside it
    (`target: random_direction`). Records: `hook` `layers.<L>.resid`, `target: residual_direction`."""
    import dataclasses

    from safesail.verify.refusal import query_lang

    lm = v.lm
    if len(ref_concept) < (2 if layer is None else 1):
        raise UserError(f"the residual direction of {qs.domain} needs at least 2 reference pairs (one to compute "
                        "it, one to choose its layer); raise verify.reference_pairs.")
    v.baseline(qs)
    half = len(ref_concept) // 2 if layer is None else len(ref_concept)
    dirs = residual_directions(lm, ref_concept[:half], ref_neutral[:half], batch_size)
    extra: dict = {"edit": "ablate: every residual writer; add: the input of block `layer`", "pairs": half,
                   "coef": coef}
    if layer is None:
        langs = [query_lang(lm.tokenizer.decode(p, skip_special_tokens=True)) for p in ref_concept[half:]]
        layer, scores, _ = select_layer(lm, dirs, ref_concept[half:], langs, ref_neutral[half:], langs, layers,
                                        max_kl=max_kl, batch_size=batch_size)
        extra["selection"] = [{k: round(x, 4) if isinstance(x, float) else x for k, x in dataclasses.asdict(s).items()}
                              for s in scores]
    r = dirs[int(layer)]
    g = torch.Generator().manual_seed(int(seed))
    rnd = torch.randn(r.shape[0], generator=g)
    rnd = rnd * (r.norm() / rnd.norm())
    extra["norm"] = round(float(r.norm()), 5)
    out = []
    for target, vec in ((TARGET, r), (CONTROL_TARGET, rnd)):
        base = {"hook": f"layers.{int(layer)}.resid", "layer": int(layer), "latent": None, "target": target,
                "domain": qs.domain}
        with ResidualDirection(vec, "ablate").apply(lm.model):
            ablated = v.answers(qs.concept, qs.langs)
        with ResidualDirection(vec, "add", layer=int(layer), coef=coef).apply(lm.model):
            added = v.answers(qs.neutral, qs.nlangs)
        recs = v.refusal(base, "ablate", ablated, qs.base_concept, qs.langs) + \
            v.refusal(base, "steer", added, qs.base_neutral, qs.nlangs)
        for e in recs:
            e.details.update(extra)
        out += recs
    return out
