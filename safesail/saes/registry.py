"""Architecture name -> SAE class, and `build_sae(cfg)`.

Every module in `safesail/saes/archs/` is imported once on first use; each defines its SAE
class under `@register_arch`, so adding an architecture is one new file there (docs/extending.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, TypeVar

import torch

from safesail.errors import UserError

if TYPE_CHECKING:
    from safesail.saes.base import SAE
    from safesail.saes.config import SAEConfig

ARCH_CLASSES: dict[str, type["SAE"]] = {}
_discovered = False
T = TypeVar("T")


def register_arch(cls: T) -> T:
    """Class decorator: make `cls` (an SAE subclass with `arch` and `Params`) buildable by name."""
    name = getattr(cls, "arch", "")
    if not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `arch` (its name in configs)")
    if name in ARCH_CLASSES and ARCH_CLASSES[name] is not cls:
        raise TypeError(f"two SAE architectures are named {name!r}: {ARCH_CLASSES[name].__name__} and {cls.__name__}")
    ARCH_CLASSES[name] = cls
    return cls


def discover() -> None:
    """Import every architecture module in safesail/saes/archs/ (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    from safesail.saes import archs

    for mod in sorted(m.name for m in pkgutil.iter_modules(archs.__path__)):
        importlib.import_module(f"safesail.saes.archs.{mod}")


def arch_names() -> list[str]:
    discover()
    return list(ARCH_CLASSES)


def arch_class(arch: str) -> type["SAE"]:
    discover()
    try:
        return ARCH_CLASSES[arch]
    except KeyError:
        raise UserError(f"SAE architecture {arch!r} is unknown; use one of {', '.join(ARCH_CLASSES)}.") from None


def build_sae(cfg: "SAEConfig | dict", device: str | torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> "SAE":
    """A freshly initialised SAE of `cfg.arch` (validates the config)."""
    from safesail.saes.config import SAEConfig

    if isinstance(cfg, dict):
        cfg = SAEConfig.from_dict(cfg)
    return arch_class(cfg.arch)(cfg.validate(), device=device, dtype=dtype)
