"""Architecture name -> SAE class, and `build_sae(cfg)`."""

from __future__ import annotations

import torch

from safesail.train.saes.base import SAE
from safesail.train.saes.batchtopk import BatchTopKSAE
from safesail.train.saes.config import SAEConfig
from safesail.train.saes.jumprelu import JumpReLUSAE
from safesail.train.saes.relu import ReLUSAE
from safesail.train.saes.topk import TopKSAE

ARCH_CLASSES: dict[str, type[SAE]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "relu": ReLUSAE,
}


def build_sae(cfg: SAEConfig | dict, device: str | torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> SAE:
    """A freshly initialised SAE of `cfg.arch` (validates the config)."""
    if isinstance(cfg, dict):
        cfg = SAEConfig.from_dict(cfg)
    cfg.validate()
    return ARCH_CLASSES[cfg.arch](cfg, device=device, dtype=dtype)
