"""Architecture name -> SAE class, and `build_sae(cfg)`.

Every module in `safesail/saes/archs/` is imported once on first use; each defines its SAE
class under `@register_arch`, so adding an architecture is one new file there (docs/extending.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import torch

from safesail.registry import Registry

if TYPE_CHECKING:
    from safesail.saes.base import SAE
    from safesail.saes.config import SAEConfig

_REGISTRY: Registry[type["SAE"]] = Registry("safesail.saes.archs", "SAE architectures")
ARCH_CLASSES: dict[str, type["SAE"]] = _REGISTRY.entries
T = TypeVar("T")


def register_arch(cls: T) -> T:
    """Class decorator: make `cls` (an SAE subclass with `arch` and `Params`) buildable by name."""
    name = getattr(cls, "arch", "")
    if not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `arch` (its name in configs)")
    return _REGISTRY.add(name, cls)


def discover() -> None:
    """Import every architecture module in safesail/saes/archs/ (once)."""
    _REGISTRY.discover()


def arch_names() -> list[str]:
    return _REGISTRY.names()


def arch_class(arch: str) -> type["SAE"]:
    return _REGISTRY.lookup(arch, "SAE architecture {name!r} is unknown; use one of {allowed}.", sort=False)


def build_sae(cfg: "SAEConfig | dict", device: str | torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> "SAE":
    """A freshly initialised SAE of `cfg.arch` (validates the config)."""
    from safesail.saes.config import SAEConfig

    if isinstance(cfg, dict):
        cfg = SAEConfig.from_dict(cfg)
    return arch_class(cfg.arch)(cfg.validate(), device=device, dtype=dtype)
