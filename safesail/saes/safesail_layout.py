"""Import/export of Safe-SAIL's released checkpoint layout (`ckpt_layer{L}.pt`, a torch.save'd dict).

Keys, each with a leading "components" axis of size 1 (reference/safe-sail-artifacts.md):
`pre_encoder_bias._bias_reference [1, d]`, `encoder.weight [1, n, d]`, `encoder.bias [1, n]`,
`encoder.theta [1, n]` (JumpReLU only), `decoder.weight [1, d, n]` (unit-norm columns).
Encoding there is `act((x - pre_bias) @ W_enc.T + b_enc)`, the same as ours, so the tensors
map one to one (our `W_dec` is their `decoder.weight` transposed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from safesail.domains import SAFESAIL_K
from safesail.errors import UserError
from safesail.saes.base import SAE
from safesail.saes.config import SAEConfig, k_archs
from safesail.saes.registry import build_sae

log = logging.getLogger(__name__)


def save_safesail_checkpoint(sae: SAE, path: str | Path) -> Path:
    """Write `sae` as a Safe-SAIL `ckpt_layer{L}.pt` dict (BatchTopK exports as TopK weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "pre_encoder_bias._bias_reference": sae.b_dec.detach().cpu()[None].clone(),
        "encoder.weight": sae.W_enc.detach().cpu()[None].clone(),
        "encoder.bias": sae.b_enc.detach().cpu()[None].clone(),
        "decoder.weight": sae.W_dec.detach().cpu().t()[None].contiguous(),
    }
    if sae.cfg.arch == "jumprelu":
        ckpt["encoder.theta"] = sae.threshold.detach().cpu()[None].clone()
    torch.save(ckpt, path)
    return path


def load_safesail_checkpoint(path: str | Path, arch: str = "topk", k: int | None = SAFESAIL_K,
                             hook: str | None = None, model: str | None = None) -> SAE:
    """Read a Safe-SAIL checkpoint into an SAE (`arch` topk/relu/jumprelu; jumprelu if `encoder.theta` exists)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"Safe-SAIL checkpoint {path} does not exist; give the path of a ckpt_layer<L>.pt file.") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"{path} is not a readable torch checkpoint ({type(e).__name__}); give a Safe-SAIL "
                        "ckpt_layer<L>.pt file.") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a Safe-SAIL state dict; give a ckpt_layer<L>.pt file.")
    needed = ["pre_encoder_bias._bias_reference", "encoder.weight", "encoder.bias"]
    missing = [key for key in needed if key not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {missing[0]!r}; it is not in Safe-SAIL's checkpoint layout.")
    w_enc = ckpt["encoder.weight"].float()
    w_enc = w_enc[0] if w_enc.dim() == 3 else w_enc
    n, d = w_enc.shape
    if "encoder.theta" in ckpt:
        arch = "jumprelu"
    cfg = SAEConfig(arch=arch, d_in=d, n_latents=n, k=k if arch in k_archs() else None,
                    hook=hook, model=model, normalize=False, b_dec_init="zeros")
    sae = build_sae(cfg)

    def one(key):
        t = ckpt[key].float()
        return t[0] if t.dim() >= 2 and t.shape[0] == 1 else t

    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(one("encoder.bias").reshape(n))
        sae.b_dec.copy_(one("pre_encoder_bias._bias_reference").reshape(d))
        if "decoder.weight" in ckpt:
            sae.W_dec.copy_(one("decoder.weight").reshape(d, n).t())
        else:
            log.warning("%s has no decoder.weight; using the encoder rows, normalised, as the decoder", path)
            sae.W_dec.copy_(w_enc / w_enc.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if arch == "jumprelu":
            sae.log_threshold.copy_(one("encoder.theta").reshape(n).clamp_min(1e-12).log())
    return sae.eval()
