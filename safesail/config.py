"""Compose the Hydra config from Python (tests, notebooks, the pipeline)."""

from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig, OmegaConf


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The same config `safesail <stage> <overrides>` would see, without Hydra's run-dir side effects."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from safesail.cli import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.set_struct(cfg, False)
    if "hydra" in cfg:
        del cfg["hydra"]
    return cfg
