"""Training curves to wandb: offline unless the user turns it on (`wandb.mode`), only on the main process."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def start_wandb(opts, cfgs: list, ctx):
    """A wandb run for the training curves (offline unless configured), or None."""
    w = opts.wandb or {}
    mode = str(w.get("mode", "disabled"))
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled" or not ctx.is_main:
        return None
    try:
        import wandb
    except ImportError:  # pragma: no cover
        log.warning("wandb is not installed; training curves are not logged")
        return None
    return wandb.init(project=w.get("project", "safesail"), entity=w.get("entity"), name=w.get("name"),
                      mode=mode, dir=w.get("dir"), config={"saes": [c.to_dict() for c in cfgs]},
                      reinit="finish_previous" if hasattr(wandb, "init") else True)
