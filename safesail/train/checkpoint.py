"""Reading the trainer's resumable checkpoint (`saes/.train/<job>.pt`; written by train_saes via safesail.atomic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def read_checkpoint(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_position(path: str | Path | None) -> int:
    """Batches already consumed according to the checkpoint at `path` (0 if none)."""
    if path is None:
        return 0
    ck = read_checkpoint(path)
    return int(ck["batches_done"]) if ck else 0
