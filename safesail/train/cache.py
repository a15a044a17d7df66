"""The cache stage (issue 2): placeholder until implemented."""
from omegaconf import DictConfig, OmegaConf


def run_cache_stage(cfg: DictConfig, args: list[str]) -> None:
    from safesail.rundir import RunDir
    rd = RunDir.from_cfg(cfg)
    rd.save_config(cfg)
    print(OmegaConf.to_yaml(cfg.model))
