"""Name -> class (or builder) registries filled by the modules of one package.

Each module of the package is imported once, on first use of the registry, and registers its
entries under a decorator; a lookup of an unknown name is a one-sentence `UserError` naming the
allowed names. Used by the LLM back ends, the SAE architectures and the scorers.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from safesail.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """The entries registered by the modules of `package` (`what`: their plural, for error messages)."""

    def __init__(self, package: str, what: str, skip_packages: bool = False):
        self.package = package
        self.what = what
        self.skip_packages = skip_packages
        self.entries: dict[str, T] = {}
        self._discovered = False

    def add(self, name: str, obj: T) -> T:
        """Register `obj` as `name`; a second, different entry of that name is a TypeError."""
        old = self.entries.get(name)
        if old is not None and old is not obj:
            both = f": {old.__name__} and {obj.__name__}" if isinstance(obj, type) else ""
            raise TypeError(f"two {self.what} are named {name!r}{both}")
        self.entries[name] = obj
        return obj

    def discover(self) -> None:
        """Import every module of the package (once), so that each registers."""
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not (self.skip_packages and m.ispkg):
                importlib.import_module(f"{self.package}.{m.name}")

    def names(self, sort: bool = False) -> list[str]:
        """The registered names (in registration order, or sorted)."""
        self.discover()
        return sorted(self.entries) if sort else list(self.entries)

    def lookup(self, name: str, unknown: str, sort: bool = True) -> T:
        """The entry `name`, or a UserError: `unknown` formatted with `name` and `allowed` (the names)."""
        self.discover()
        try:
            return self.entries[name]
        except KeyError:
            raise UserError(unknown.format(name=name, allowed=", ".join(self.names(sort)))) from None
