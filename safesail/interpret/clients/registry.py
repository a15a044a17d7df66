"""`llm.backend` name -> LLM client class, and `make_client(llm_cfg)`.

Every module of `safesail/interpret/clients/` is imported once on first use; a back end's
module defines its client class under `@register_backend("<name>", ...)`, with a `Settings`
dataclass (a subclass of `config_types.LLMConfig` naming the type of each of its own keys;
the defaults live only in `configs/llm/*.yaml`) and a `from_settings(settings, cache_dir,
device)` constructor. Adding a back end is therefore one new file (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from safesail.config_types import LLMConfig, load_group
from safesail.errors import UserError
from safesail.registry import Registry

if TYPE_CHECKING:
    from safesail.interpret.clients.base import LLMClient

_REGISTRY: Registry[type] = Registry("safesail.interpret.clients", "LLM back ends")
BACKENDS: dict[str, type] = _REGISTRY.entries
T = TypeVar("T")


def register_backend(*names: str):
    """Class decorator: make an LLMClient subclass buildable as `llm.backend=<name>` (any of `names`)."""
    def deco(cls: T) -> T:
        settings = getattr(cls, "Settings", None)
        if not (dataclasses.is_dataclass(settings) and issubclass(settings, LLMConfig)):
            raise TypeError(f"{cls.__name__} needs a `Settings` dataclass subclassing config_types.LLMConfig")
        if not callable(getattr(cls, "from_settings", None)):
            raise TypeError(f"{cls.__name__} needs a classmethod from_settings(settings, cache_dir, device)")
        for name in names:
            _REGISTRY.add(name, cls)
        return cls
    return deco


def discover() -> None:
    """Import every module of safesail/interpret/clients/ (once), so that each back end registers."""
    _REGISTRY.discover()


def backend_names() -> list[str]:
    return _REGISTRY.names()


def backend_class(name) -> type:
    return _REGISTRY.lookup(str(name), "llm.backend {name!r} is unknown; use one of {allowed} "
                            "(llm=<file> picks a configs/llm/*.yaml).")


def load_llm(llm_cfg) -> LLMConfig:
    """The typed settings of an llm group: its back end's `Settings`, every key checked (one sentence)."""
    backend = llm_cfg.get("backend") if hasattr(llm_cfg, "get") else None
    if backend is None:
        raise UserError("the config lacks llm.backend; pick a back end with llm=<file> (configs/llm/*.yaml).")
    return load_group(llm_cfg, backend_class(backend).Settings, "llm")


def make_client(llm_cfg, cache_path: Path | None = None, cache_dir: str | Path | None = None,
                device: str = "cpu") -> "LLMClient":
    """Build the client named by `llm_cfg.backend`, wrapped in the response cache when `llm.cache`."""
    settings = load_llm(llm_cfg)
    client = backend_class(settings.backend).from_settings(settings, cache_dir=cache_dir, device=device)
    if cache_path is None or not settings.cache:
        return client
    from safesail.interpret.clients.cache import CachedClient

    return CachedClient(client, Path(cache_path))
