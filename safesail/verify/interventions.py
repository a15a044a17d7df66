"""Interventions on a live model at hooked layers: add, clamp and ablate SAE latents; add or
project out a raw direction. The one implementation used by `safesail verify`, `/api/steer`
and `safesail diagnose --ablate/--clamp/--add`.

At a hook point with SAE codes `z = encode(x)` and decoder rows `d_i`:

- ``ablate i``: `x' = x - z_i d_i`. The SAE's reconstruction error is kept (the edit is the
  difference of two decodes), so nothing but latent i's contribution changes, and where
  `z_i = 0` the activation is bit-for-bit unchanged.
- ``clamp i = c``: `x' = x + (c s_i - z_i) d_i`, where `s_i` is the latent's typical
  activation (its 0.999 quantile): `c` is a normalized activation.
- ``add i = a``: `x' = x + a s_i d_i` on every position (prompt and answer), or with
  `positions="answer"` only where the answer is generated: in a pass over prompts (no KV cache yet)
  only at their last position (left-padded: the last column), the one that predicts the first answer
  token, then at every generated token (`POSITIONS`).
- a raw direction `v` (diff-in-means reference, a random latent of the same norm):
  ``add`` gives `x' = x + v`, ``project_out`` gives `x' = x - (x.u) u` with `u = v/|v|`.

Several edits at once, on one or several layers; they apply to every forward pass run
inside `Intervention.apply(model)`: generation (with or without a KV cache) as well as a
scoring pass. Strengths are normalized activations, so `add 7_850=4` adds four times the
latent's 0.999-quantile activation along its decoder direction.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from safesail.errors import UserError
from safesail.hooks import HookPoint, hook_module

MODES = ("add", "clamp", "ablate")
POSITIONS = ("all", "answer")     # where additive edits apply: every position, or the answer's only
DIRECTION_MODES = ("add", "project_out")
MAX_STRENGTH = 100.0
_ID = re.compile(r"^\s*(\d+)_(\d+)\s*$")


@dataclass
class SteerableSAE:
    """One hook point's SAE with the typical activation (0.999 quantile) of the latents it knows."""

    hook: HookPoint
    sae: nn.Module
    scales: dict[int, float] = field(default_factory=dict)

    @property
    def n_latents(self) -> int:
        return int(self.sae.W_dec.shape[0])

    def direction(self, latent: int) -> torch.Tensor:
        return self.sae.W_dec[int(latent)].detach()

    @classmethod
    def from_bound(cls, b) -> "SteerableSAE":
        """From the diagnose engine's `BoundSAE` (database latents and their quantiles)."""
        return cls(b.hook, b.sae, dict(zip(b.latent_ids.tolist(), b.q999.tolist())))


@dataclass(frozen=True)
class LatentEdit:
    layer: int
    latent: int
    mode: str                 # add | clamp | ablate
    strength: float = 0.0     # normalized activation (ignored by ablate)

    @property
    def neuron_id(self) -> str:
        return f"{self.layer}_{self.latent}"


@dataclass
class DirectionEdit:
    layer: int
    vector: torch.Tensor      # [d]: added as is (add), or its unit direction removed (project_out)
    mode: str = "add"
    site: str = "mlp_out"


def parse_neuron_id(text: str) -> tuple[int, int]:
    """`"14_3598"` -> (14, 3598): layer and latent index, as the neuron DB names them."""
    m = _ID.match(str(text))
    if not m:
        raise UserError(f"latent id {text!r} is not of the form <layer>_<index> (e.g. 14_3598); "
                        "copy it from a token's table.")
    return int(m.group(1)), int(m.group(2))


def parse_edit(text: str, mode: str) -> LatentEdit:
    """`--ablate 14_3598`, `--clamp 14_3598=0.5`, `--add 7_850=4` -> a LatentEdit."""
    if mode not in MODES:
        raise UserError(f"unknown intervention {mode!r}; use one of {', '.join(MODES)}.")
    ident, eq, value = str(text).partition("=")
    if mode == "ablate":
        if eq:
            raise UserError(f"--ablate takes a latent id without a strength (got {text!r}); write e.g. 14_3598.")
        strength = 0.0
    else:
        if not eq:
            raise UserError(f"--{mode} needs a strength: write <layer>_<index>=<strength>, e.g. 7_850=4.")
        try:
            strength = float(value)
        except ValueError:
            raise UserError(f"the strength {value!r} of --{mode} {ident} is not a number; write e.g. "
                            f"{ident}=4.") from None
    layer, latent = parse_neuron_id(ident)
    return LatentEdit(layer, latent, mode, strength)


def _check_strength(e: LatentEdit, max_strength: float) -> None:
    if e.mode == "ablate":
        return
    if not math.isfinite(e.strength) or abs(e.strength) > max_strength:
        raise UserError(f"the strength {e.strength} for {e.mode} {e.neuron_id} is out of range; use a "
                        f"normalized activation between -{max_strength:g} and {max_strength:g}.")
    if e.mode == "clamp" and e.strength < 0:
        raise UserError(f"clamp {e.neuron_id}={e.strength}: SAE codes are never negative; clamp to 0 or more "
                        "(0 is the same as ablate).")


class _HookEdit:
    """Everything applied at one hook point."""

    def __init__(self, s: SteerableSAE | None):
        self.s = s
        self.code_idx: list[int] = []      # latents whose codes are replaced (ablate / clamp)
        self.code_target: list[float | None] = []   # None: 0 (ablate); else the raw value to clamp to
        self.add = None                    # [d] summed additive vector
        self.project: list[torch.Tensor] = []
        self.rows: torch.Tensor | None = None   # [batch] bool: edit only these rows (None: all)
        self.answer_only = False           # additive edits only at the answer's positions (POSITIONS)
        self.prefill = False               # set per pass by `_track_prefill`: a pass over prompts, no cache yet

    def add_vector(self, v: torch.Tensor) -> None:
        self.add = v.detach().float().clone() if self.add is None else self.add + v.detach().float()

    def _masked(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None or x.dim() < 3:
            return delta
        keep = self.rows.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return delta * keep

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape, out = x.shape, x
        if self.code_idx:
            sae = self.s.sae
            flat = x.reshape(-1, shape[-1])
            idx = torch.tensor(self.code_idx, device=x.device)
            z = sae.encode(flat).index_select(1, idx)                       # [N, m]
            target = torch.zeros_like(z)
            for j, t in enumerate(self.code_target):
                if t is not None:
                    target[:, j] = t
            coef = target - z
            if bool(coef.any()):
                delta = coef.to(sae.W_dec.dtype) @ sae.W_dec.index_select(0, idx)
                out = out + self._masked(delta.reshape(shape).to(x.dtype), x)
        if self.add is not None:
            add = self.add.to(device=x.device, dtype=x.dtype).expand_as(x)
            if self.answer_only and self.prefill and x.dim() == 3 and x.shape[1] > 1:
                last = torch.zeros((1, x.shape[1], 1), device=x.device, dtype=x.dtype)
                last[:, -1] = 1
                add = add * last
            out = out + self._masked(add, x)
        for u in self.project:
            u = u.to(device=x.device, dtype=x.dtype)
            out = out - self._masked((out @ u).unsqueeze(-1) * u, x)
        return out


class Intervention:
    """A validated set of edits; `with iv.apply(model): model.generate(...)` runs under them."""

    def __init__(self, saes: Sequence[SteerableSAE], latent_edits: Iterable[LatentEdit] = (),
                 direction_edits: Iterable[DirectionEdit] = (), max_strength: float = MAX_STRENGTH,
                 site: str = "mlp_out", positions: str = "all"):
        if positions not in POSITIONS:
            raise UserError(f"steering positions {positions!r} are unknown; use {' or '.join(POSITIONS)}.")
        self.positions = positions
        self.latent_edits = list(latent_edits)
        self.direction_edits = list(direction_edits)
        by_layer = {s.hook.layer: s for s in saes}
        self.per_hook: dict[HookPoint, _HookEdit] = {}
        for e in self.latent_edits:
            if e.mode not in MODES:
                raise UserError(f"unknown intervention {e.mode!r}; use one of {', '.join(MODES)}.")
            s = by_layer.get(int(e.layer))
            if s is None:
                raise UserError(f"there is no SAE on layer {e.layer} for {e.neuron_id}; pick a latent of layer "
                                f"{', '.join(str(x) for x in sorted(by_layer)) or '(none)'}.")
            if not 0 <= e.latent < s.n_latents:
                raise UserError(f"latent {e.neuron_id} does not exist: the SAE on layer {e.layer} has "
                                f"{s.n_latents} latents (0..{s.n_latents - 1}); check the id.")
            _check_strength(e, max_strength)
            scale = s.scales.get(int(e.latent))
            if e.mode != "ablate" and not (scale is not None and math.isfinite(scale) and scale > 0):
                raise UserError(f"latent {e.neuron_id} has no typical activation (0.999 quantile) in the "
                                f"database, so a strength for {e.mode} means nothing; pick a latent the "
                                "database lists, or ablate it.")
            h = self.per_hook.setdefault(s.hook, _HookEdit(s))
            if e.mode == "add":
                h.add_vector(float(e.strength) * float(scale) * s.direction(e.latent).float())
            else:
                h.code_idx.append(int(e.latent))
                h.code_target.append(None if e.mode == "ablate" else float(e.strength) * float(scale))
        for d in self.direction_edits:
            if d.mode not in DIRECTION_MODES:
                raise UserError(f"unknown direction intervention {d.mode!r}; use add or project_out.")
            hp = HookPoint(int(d.layer), d.site)
            h = self.per_hook.setdefault(hp, _HookEdit(by_layer.get(int(d.layer))))
            if d.mode == "add":
                h.add_vector(d.vector)
            else:
                n = float(d.vector.norm())
                if n == 0:
                    raise UserError(f"the direction to project out at layer {d.layer} is zero; it has no direction.")
                h.project.append(d.vector.detach().float() / n)
        for h in self.per_hook.values():
            h.answer_only = positions == "answer"

    def __bool__(self) -> bool:
        return bool(self.per_hook)

    def describe(self) -> list[dict]:
        out = [{"neuron_id": e.neuron_id, "layer": e.layer, "latent": e.latent, "mode": e.mode,
                "strength": e.strength} for e in self.latent_edits]
        out += [{"layer": d.layer, "mode": d.mode, "norm": float(d.vector.norm())} for d in self.direction_edits]
        return out

    @contextlib.contextmanager
    def apply(self, model: nn.Module, rows: Sequence[bool] | None = None):
        """Edit every forward pass of `model` inside the block; `rows`: only these batch rows."""
        handles = []
        mask = None if rows is None else torch.tensor([bool(r) for r in rows])
        for edit in self.per_hook.values():
            edit.rows = mask

        def make(edit: _HookEdit):
            def hook(_module, _inputs, output):
                if isinstance(output, (tuple, list)):
                    return (edit(output[0]), *output[1:])
                return edit(output)
            return hook

        try:
            for hp, edit in self.per_hook.items():
                handles.append(hook_module(model, hp).register_forward_hook(make(edit)))
            handles += _track_prefill(model, self.per_hook.values())
            yield self
        finally:
            for h in handles:
                h.remove()
            for edit in self.per_hook.values():
                edit.rows = None


def _track_prefill(model: nn.Module, edits) -> list:
    """For answer-only edits: a pre-hook on the base model that tells each edit whether the pass about to
    run is over prompts (no KV cache, or an empty one: only the last position is edited) or continues a
    cache (generated tokens, a trie of continuations: every position is)."""
    edits = [e for e in edits if e.answer_only]
    if not edits:
        return []
    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model

    def pre(_module, _args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        for e in edits:
            e.prefill = seen == 0

    return [base.register_forward_pre_hook(pre, with_kwargs=True)]


def steering_norm(s: SteerableSAE, latent: int, strength: float) -> float:
    """|strength * s_i * d_i|: the norm a reference direction gets to be compared with latent i."""
    scale = s.scales.get(int(latent))
    if scale is None:
        raise UserError(f"latent {s.hook.layer}_{latent} has no 0.999 quantile; collect its statistics first.")
    return abs(float(strength)) * float(scale) * float(s.direction(latent).norm())


def scaled(vector: torch.Tensor, norm: float) -> torch.Tensor:
    """`vector` rescaled to the given norm (a zero vector stays zero)."""
    n = float(vector.norm())
    return vector * (norm / n) if n > 0 else vector.clone()


class PerRow:
    """Each batch row under its own Intervention (None: unmodified), all in one forward pass.

    `with PerRow(ivs).apply(model): model.generate(batch)` computes every row as
    `with ivs[r].apply(model)` would for that row alone: at each hook point the rows of one
    intervention are edited together. A batch of `k * len(ivs)` rows (a KV cache repeated
    per row, e.g. for the refusal openings) gives each consecutive block of k rows the
    intervention of its row.
    """

    def __init__(self, ivs: Sequence[Intervention | None]):
        self.ivs = list(ivs)
        self.groups: dict[HookPoint, list[tuple[_HookEdit, list[int]]]] = {}
        seen: dict[int, list[int]] = {}
        for r, iv in enumerate(self.ivs):
            if iv:
                seen.setdefault(id(iv), []).append(r)
        by_id = {id(iv): iv for iv in self.ivs if iv}
        for key, rows in seen.items():
            for hp, edit in by_id[key].per_hook.items():
                self.groups.setdefault(hp, []).append((edit, rows))

    def __bool__(self) -> bool:
        return bool(self.groups)

    def _edit(self, parts, x: torch.Tensor) -> torch.Tensor:
        n = len(self.ivs)
        if x.dim() < 3 or x.shape[0] % n:
            raise ValueError(f"a per-row intervention of {n} rows got a batch of shape {tuple(x.shape)}")
        k = x.shape[0] // n
        out = x.clone()
        for edit, rows in parts:
            idx = torch.tensor(rows, device=x.device)
            if k > 1:
                idx = (idx.unsqueeze(1) * k + torch.arange(k, device=x.device)).reshape(-1)
            out[idx] = edit(x[idx])
        return out

    @contextlib.contextmanager
    def apply(self, model: nn.Module):
        handles = []

        def make(parts):
            def hook(_module, _inputs, output):
                if isinstance(output, (tuple, list)):
                    return (self._edit(parts, output[0]), *output[1:])
                return self._edit(parts, output)
            return hook

        try:
            for hp, parts in self.groups.items():
                for edit, _ in parts:
                    edit.rows = None
                handles.append(hook_module(model, hp).register_forward_hook(make(parts)))
            handles += _track_prefill(model, [e for parts in self.groups.values() for e, _ in parts])
            yield self
        finally:
            for h in handles:
                h.remove()


def per_row(ivs: Sequence[Intervention | None] | None):
    """A context manager factory: `with per_row(ivs).apply(model)` (no-op when no row is edited)."""
    return PerRow(ivs or [])
