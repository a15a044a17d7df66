"""Logging set-up shared by every stage: INFO to stderr, one line per record."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("SAFESAIL_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    fmt = logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_safesail", False) for h in root.handlers):
        for h in list(root.handlers):
            root.removeHandler(h)
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        handler._safesail = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # Hydra's "disabled" job logging disables every logger that existed before it ran
    # (our modules imported before the stage); switch ours back on.
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.split(".")[0] == "safesail" and isinstance(logger, logging.Logger):
            logger.disabled = False
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
