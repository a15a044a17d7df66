"""Collected run directories for the interpret tests: a stand-in SAE, a small corpus, collect on the tiny model."""

from __future__ import annotations

import json

import torch

from omegaconf import OmegaConf

from safesail.config import CONFIG_DIR
from safesail.interpret.collect import CollectSettings, HookInputs, collect_latents
from safesail.rundir import RunDir

HOOK = "layers.1.mlp_out"


def collect_group(**values):
    """configs/collect/default.yaml (seed: the root config's run.seed) with `values` on top."""
    root = OmegaConf.create({"run": OmegaConf.load(CONFIG_DIR / "config.yaml").run,
                             "collect": OmegaConf.load(CONFIG_DIR / "collect" / "default.yaml")})
    return OmegaConf.merge(root, {"collect": values}).collect


def collect_settings(**values) -> CollectSettings:
    """Typed collect settings: the YAML defaults, with the values a test states explicitly."""
    return CollectSettings.defaults(**values)


class StandInSAE(torch.nn.Module):
    """A ReLU encoder with the interface of safesail.saes (cfg + encode); latent 0 never fires."""

    def __init__(self, d_in: int, n_latents: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(d_in, n_latents, generator=g) / d_in ** 0.5)
        b = torch.full((n_latents,), -0.15)
        b[0] = -1e6
        self.b = torch.nn.Parameter(b)
        self.cfg = {"arch": "relu", "d_in": d_in, "n_latents": n_latents, "k": None, "hook": HOOK, "model": "tiny"}

    def encode(self, x):
        return torch.relu(x @ self.W + self.b)


def _corpus(tmp_path):
    lines = []
    for i in range(60):
        lines.append({"text": f"Document {i}: the river {i % 7} flows past the old mill, and birds sing "
                              f"about number {i * 13 % 50} while children play games near the water."})
    p = tmp_path / "corpus.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p


def _windows(tiny_model, tmp_path, max_tokens=2048):
    from omegaconf import OmegaConf

    from safesail.corpus import iter_documents, pack_windows

    data = OmegaConf.create({"paths": [str(_corpus(tmp_path))], "hub": None, "text_field": "text"})
    return list(pack_windows(iter_documents(data, tiny_model.tokenizer), tiny_model.tokenizer, 64, max_tokens))


def make_collected_run(cfg, tiny_model, n_latents: int = 8) -> RunDir:
    """A run directory whose latents/<hook>/ was written by collect (tiny model + stand-in SAE)."""
    rd = RunDir.from_cfg(cfg)
    windows = _windows(tiny_model, rd.root)
    sae = StandInSAE(tiny_model.hidden_size, n_latents)
    s = collect_settings(k_top=32, n_bins=8, n_levels=4, segment_len=12, explain_per_level=2, score_per_level=1,
                         random_pool=32, min_examples=2, batch_size=8)
    hooks = [HookInputs(HOOK, sae, list(range(n_latents)), rd.latents(HOOK), {"which_latents": "list"})]
    collect_latents(tiny_model, hooks, iter(windows), rd.root / "latents", s, "fp", {"model": "tiny"})
    return rd
