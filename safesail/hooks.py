"""Hook points: where SAEs read the model.

A hook point is named `layers.{L}.mlp_out` (output of `model.layers.{L}.mlp.down_proj`,
Safe-SAIL's choice) or `layers.{L}.resid` (residual stream after block L). Works
for Llama-, Qwen2- and Mistral-style models (`model.model.layers[L].mlp.down_proj`).

`capture_activations` runs a forward pass and stops it right after the last
hooked layer, so no compute is spent on later layers or the LM head.
`splice` replaces a hook point's output (for CE-loss-recovered evaluation).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from safesail.errors import UserError

SITES = ("mlp_out", "resid")
_NAME = re.compile(r"^layers\.(\d+)\.(mlp_out|resid)$")


@dataclass(frozen=True, order=True)
class HookPoint:
    layer: int
    site: str = "mlp_out"

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.site}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> "HookPoint":
        m = _NAME.match(str(name))
        if not m:
            raise UserError(f"hook point {name!r} is not of the form layers.<L>.mlp_out or layers.<L>.resid.")
        return cls(int(m.group(1)), m.group(2))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a Llama/Qwen2/Mistral-style causal LM."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UserError(f"cannot find the transformer blocks of {type(model).__name__}; Safe-SAIL supports "
                    "Llama-, Qwen2- and Mistral-style models (model.model.layers).")


def hook_points(layers: Iterable[int], site: str, num_layers: int) -> list[HookPoint]:
    """Validate a layer list against the model and return its hook points, sorted."""
    if site not in SITES:
        raise UserError(f"hook site {site!r} is unknown; use mlp_out or resid.")
    layers = [int(x) for x in layers]
    if not layers:
        raise UserError("model.layers is empty; list at least one layer to hook, e.g. model.layers=[0,8].")
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise UserError(f"layer {bad[0]} is out of range: the model has {num_layers} layers (0..{num_layers - 1}); "
                        "fix model.layers.")
    return sorted({HookPoint(x, site) for x in layers})


def configured_hooks(cfg, num_layers: int | None = None) -> list[HookPoint]:
    """The hook points a run works on, for every stage: `sae.hooks` when set, else each layer
    of `model.layers` at `model.hook_site`; sorted, validated against the model when its
    layer count is given."""
    from omegaconf import OmegaConf

    names = OmegaConf.select(cfg, "sae.hooks", default=None)
    if names is not None and not isinstance(names, str):
        names = list(OmegaConf.to_container(names, resolve=True)) if OmegaConf.is_config(names) else list(names)
    if names:
        points = sorted({HookPoint.parse(n) for n in ([names] if isinstance(names, str) else names)})
    else:
        site = str(OmegaConf.select(cfg, "model.hook_site", default="mlp_out") or "mlp_out")
        layers = OmegaConf.select(cfg, "model.layers", default=None) or []
        if site not in SITES:
            raise UserError(f"hook site {site!r} is unknown; use mlp_out or resid.")
        points = sorted({HookPoint(int(x), site) for x in layers})
    if not points:
        raise UserError("no hook points are configured; list layers in model.layers (e.g. model.layers=[0,8]) "
                        "or hooks in sae.hooks.")
    if num_layers is not None:
        bad = [hp for hp in points if not 0 <= hp.layer < num_layers]
        if bad:
            raise UserError(f"hook {bad[0]} is out of range: the model has {num_layers} layers (0..{num_layers - 1}); "
                            "fix model.layers or sae.hooks.")
    return points


def hook_module(model: nn.Module, hp: HookPoint) -> nn.Module:
    block = decoder_layers(model)[hp.layer]
    if hp.site == "resid":
        return block
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        raise UserError(f"block {hp.layer} of {type(model).__name__} has no .mlp module; use model.hook_site=resid.")
    return getattr(mlp, "down_proj", mlp)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def _hooks(handles: list):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_activations(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        points: Sequence[HookPoint], stop_early: bool = True,
                        transform: Callable[[HookPoint, torch.Tensor], torch.Tensor] | None = None,
                        ) -> dict[str, torch.Tensor]:
    """Run the model on a batch and return `{hook name: [batch, seq, d]}` activations.

    With `stop_early` the forward pass ends after the last hooked block.
    `transform(hp, act)` may move/convert each activation as soon as it exists
    (e.g. copy to pinned host memory) so that GPU memory stays bounded.
    """
    out: dict[str, torch.Tensor] = {}
    last = max(points, key=lambda p: p.layer) if points else None
    handles = []

    def make(hp: HookPoint):
        def fn(_module, _inputs, output):
            act = _first(output).detach()
            out[hp.name] = transform(hp, act) if transform else act
            if stop_early and hp == last and len(out) == len(points):
                raise _StopForward
        return fn

    for hp in points:
        handles.append(hook_module(model, hp).register_forward_hook(make(hp)))
    with _hooks(handles), torch.no_grad():
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    return out


@contextlib.contextmanager
def splice(model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, replace the output of hook point `hp` by `fn(output)`."""

    def hook(_module, _inputs, output):
        if isinstance(output, (tuple, list)):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = hook_module(model, hp).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def special_token_mask(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """True where a token is a special (chat-template) token; such tokens are left out of statistics."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype,
                           device=input_ids.device)
    return torch.isin(input_ids, special)
