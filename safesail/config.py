"""The Hydra config: where it lives, how it is composed, and how overrides are checked.

`CONFIG_DIR` is the `configs/` folder next to the package (editable install) or
$SAFESAIL_CONFIG_DIR. `compose()` gives the config `safesail <stage> <overrides>` sees.
`check_overrides()` composes every override combination the command line asks for and turns
Hydra's composition errors and wrong value types into one UserError sentence naming the key
and what it accepts, before any stage writes anything (`safesail/config_types.py` holds the
types of each config group; the YAML files hold the defaults).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from safesail.errors import UserError

CONFIG_DIR = Path(os.environ.get("SAFESAIL_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


def config_groups() -> dict[str, list[str]]:
    """Config group name -> its options (YAML file names without .yaml)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONFIG_DIR.iterdir()) if d.is_dir() and not d.name.startswith((".", "_"))}


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The same config `safesail <stage> <overrides>` would see, without Hydra's run-dir side effects."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    if "hydra" in cfg:
        del cfg["hydra"]
    return cfg


def _parse(overrides: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed.append(parser.parse_override(line))
        except HydraException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read the override {line!r} ({first}); write key=value, e.g. sae.k=32.") from None
    return parsed


def _combinations(parsed) -> list[list[str]]:
    """Override lists to compose: the first value of every sweep, then each other sweep value in turn."""
    def line(o, value: str | None) -> str:
        return o.input_line if value is None else f"{o.get_key_element()}={value}"

    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [None] for o in parsed]
    first = [line(o, v[0]) for o, v in zip(parsed, values)]
    combos = [first]
    for i, (o, vs) in enumerate(zip(parsed, values)):
        for v in vs[1:]:
            combos.append(first[:i] + [line(o, v)] + first[i + 1:])
    return combos


def _unknown_key_message(key: str, line: str, base: DictConfig) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    while parent and not isinstance(node, DictConfig):  # the deepest existing parent
        parent, _, leaf = parent.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
    allowed = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    where = f"{parent}." if parent else ""
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f"did you mean {where}{close[0]}? " if close else ""
    return (f"unknown config key {key!r} in {line!r}; {hint}{'keys under ' + parent if parent else 'top-level keys'}: "
            f"{', '.join(allowed)} (prefix a new key with +).")


def _missing_option_message(message: str, line: str) -> str | None:
    groups = config_groups()
    for group, options in groups.items():
        if f"'{group}/" in message:
            name = line.split("=", 1)[1] if "=" in line else line
            return f"unknown {group} {name!r} in {line!r}; choose one of: {', '.join(options)}."
    return None


def _composition_error(e: Exception, combo: list[str], parsed) -> UserError:
    from omegaconf.errors import ConfigKeyError

    text = str(e).strip()
    for o in parsed:
        key = o.key_or_group
        line = next((c for c in combo if c.lstrip("+~").split("=", 1)[0] == key), o.input_line)
        if f"'{key}'" in text or f"'{o.get_key_element()}'" in text or f"'{key}/" in text:
            missing = _missing_option_message(text, line)
            if missing:
                return UserError(missing)
            if "Could not override" in text or "Could not delete" in text or isinstance(e.__cause__, ConfigKeyError):
                base = compose([c for c in combo if c != line and "=" in c and c.split("=", 1)[0] in config_groups()])
                return UserError(_unknown_key_message(key, line, base))
    first = next((s for s in text.splitlines() if s.strip()), type(e).__name__)
    return UserError(f"the config cannot be composed from {' '.join(combo)!r}: {first.rstrip('.')}; fix the override.")


def check_overrides(overrides: Sequence[str]) -> DictConfig:
    """Compose every combination of the command line's overrides; return the first config.

    A mistyped key (`modle=tiny`), a missing group option (`model=tnyi`) or a value of the
    wrong type (`sae.k=abc`) is a UserError of one sentence naming the key and what it accepts.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from safesail.config_types import check_config

    parsed = _parse(overrides)
    groups = config_groups()
    keys = [o.key_or_group for o in parsed if not o.is_delete()]
    first: DictConfig | None = None
    defaults_of: dict[tuple[str, ...], DictConfig] = {}
    for combo in _combinations(parsed):
        try:
            cfg = compose(combo)
        except (HydraException, OmegaConfBaseException) as e:
            raise _composition_error(e, combo, parsed) from None
        # the YAML defaults of the same group choices: the type of an undeclared overridden key
        choices = tuple(c for c in combo if c.split("=", 1)[0].lstrip("+") in groups)
        if any("." in k for k in keys) and choices not in defaults_of:
            defaults_of[choices] = compose(list(choices))
        check_config(cfg, keys, defaults_of.get(choices))
        first = first if first is not None else cfg
    return first if first is not None else compose([])
