"""EleutherAI sparsify's folder layout (`cfg.json` + `sae.safetensors`), both ways.

A sparsify folder (one per hookpoint, e.g. `layers.7.mlp`) holds `cfg.json` with the
`SparseCoderConfig` fields plus `d_in` (`activation`, `expansion_factor`, `normalize_decoder`,
`num_latents`, `k`, `multi_topk`, `skip_connection`, `transcode`) and `sae.safetensors` with
`encoder.weight [n, d]`, `encoder.bias [n]`, `W_dec [n, d]`, `b_dec [d]`. sparsify encodes
`topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias))` and decodes `z @ W_dec + b_dec`:
our TopK SAE, tensor for tensor. sparsify reads `expansion_factor` unless `num_latents` is
set, so the export writes both. Only TopK SAEs have a sparsify form.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safesail.errors import UserError
from safesail.saes.base import SAE
from safesail.saes.config import SAEConfig
from safesail.saes.registry import build_sae

WEIGHTS = "sae.safetensors"


def export_sparsify(sae: SAE, folder: str | Path) -> Path:
    """Write a TopK `sae` as a sparsify folder that `SparseCoder.load_from_disk(folder)` reads."""
    c = sae.cfg
    if c.arch not in ("topk", "matryoshka_topk"):  # a Matryoshka TopK SAE encodes as a TopK one
        raise UserError(f"sparsify has only TopK SAEs, and this one is {c.arch}; export it with "
                        "--format saelens or --format safesail instead.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": sae.W_enc.detach().cpu().float().contiguous(),
               "encoder.bias": sae.b_enc.detach().cpu().float().contiguous(),
               "W_dec": sae.W_dec.detach().cpu().float().contiguous(),
               "b_dec": sae.b_dec.detach().cpu().float().contiguous()}
    save_file(tensors, str(folder / WEIGHTS))
    cfg = {"activation": "topk", "expansion_factor": max(1, c.n_latents // c.d_in), "normalize_decoder": True,
           "num_latents": int(c.n_latents), "k": int(c.k), "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": int(c.d_in)}
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return folder


def is_sparsify_folder(folder: Path) -> bool:
    return (folder / "cfg.json").is_file() and (folder / WEIGHTS).is_file() and _looks_like(folder / "cfg.json")


def _looks_like(cfg_path: Path) -> bool:
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "d_in" in cfg and ("expansion_factor" in cfg or "num_latents" in cfg) \
        and "format" not in cfg


def load_sparsify(folder: str | Path, hook: str | None = None, model: str | None = None) -> SAE:
    """Read one sparsify hookpoint folder into our TopK SAE (same codes and reconstruction)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no cfg.json; give a sparsify hookpoint folder (cfg.json + "
                        f"{WEIGHTS}).") from None
    except ValueError:
        raise UserError(f"{folder / 'cfg.json'} is not valid JSON; give a sparsify hookpoint folder.") from None
    if not isinstance(cfg, dict) or "d_in" not in cfg:
        raise UserError(f"{folder / 'cfg.json'} is not a sparsify config (no d_in); give a sparsify hookpoint "
                        "folder.")
    for key, why in (("transcode", "a transcoder"), ("skip_connection", "a skip connection")):
        if cfg.get(key):
            raise UserError(f"the sparsify coder in {folder} has {why}, which Safe-SAIL's SAEs cannot hold; "
                            "import a plain TopK SAE.")
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"the sparsify coder in {folder} uses the {cfg['activation']!r} activation; only topk "
                        "imports.")
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} has cfg.json but no {WEIGHTS}; copy the whole sparsify folder.")
    state = load_file(str(folder / WEIGHTS))
    missing = [k for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if k not in state]
    if missing:
        raise UserError(f"{folder / WEIGHTS} lacks {missing[0]!r}; it is not a sparsify SAE with a decoder.")
    d = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or d * int(cfg.get("expansion_factor", 32)))
    w_enc = state["encoder.weight"].float()
    if tuple(w_enc.shape) != (n, d):
        raise UserError(f"{folder / WEIGHTS} holds an encoder of shape {tuple(w_enc.shape)}, not ({n}, {d}) as "
                        "cfg.json says; the folder is damaged.")
    sae = build_sae(SAEConfig(arch="topk", d_in=d, n_latents=n, k=int(cfg.get("k", 32)), hook=hook, model=model,
                              normalize=False, b_dec_init="zeros",
                              extra={"imported": {"format": "sparsify", "from": str(folder)}}))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(state["encoder.bias"].float())
        sae.W_dec.copy_(state["W_dec"].float())
        sae.b_dec.copy_(state["b_dec"].float())
    return sae.eval()
