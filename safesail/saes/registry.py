"""Architecture name -> SAE class, and `build_sae(cfg)`."""

from __future__ import annotations

import torch

from safesail.saes.base import SAE
from safesail.saes.batchtopk import BatchTopKSAE
from safesail.saes.config import SAEConfig
from safesail.saes.jumprelu import JumpReLUSAE
from safesail.saes.relu import ReLUSAE
from safesail.saes.topk import TopKSAE

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
