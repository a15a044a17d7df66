"""Export to SAELens's folder layout (`cfg.json` + `sae_weights.safetensors`).

SAELens stores `W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`, `b_dec`, and `threshold`
for JumpReLU; `apply_b_dec_to_input: true` matches our encoder reading `x - b_dec`. The
hook name is the Hugging Face module path (`model.layers.{L}.mlp.down_proj` output, or the
block output for `resid`), since our models are plain transformers models.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from safesail.hooks import HookPoint
from safesail.saes.base import SAE

_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}


def hf_module_name(hook: str | None) -> str | None:
    if not hook:
        return None
    hp = HookPoint.parse(hook)
    return f"model.layers.{hp.layer}.mlp.down_proj" if hp.site == "mlp_out" else f"model.layers.{hp.layer}"


def export_saelens(sae: SAE, folder: str | Path, context_size: int | None = None) -> Path:
    """Write `sae` in SAELens's layout. BatchTopK exports as JumpReLU with its learned threshold for every latent."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = sae.cfg
    tensors = {
        "W_enc": sae.W_enc.detach().cpu().t().contiguous(),
        "b_enc": sae.b_enc.detach().cpu().clone(),
        "W_dec": sae.W_dec.detach().cpu().clone(),
        "b_dec": sae.b_dec.detach().cpu().clone(),
    }
    if c.arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().cpu().clone()
    elif c.arch == "batchtopk":
        tensors["threshold"] = sae.threshold.detach().cpu().clamp_min(0).expand(c.n_latents).clone()
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    layer = HookPoint.parse(c.hook).layer if c.hook else None
    cfg = {
        "architecture": _ARCH[c.arch],
        "d_in": c.d_in,
        "d_sae": c.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "model_name": c.model,
        "hook_name": hf_module_name(c.hook),
        "hook_layer": layer,
        "hook_head_index": None,
        "activation_fn_str": "topk" if c.arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": c.k} if c.arch == "topk" else {},
        "k": c.k if c.arch == "topk" else None,
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "context_size": context_size,
        "prepend_bos": False,
        "dataset_path": None,
        "sae_lens_training_version": None,
        "model_from_pretrained_kwargs": {},
        "metadata": {"exported_by": "safesail", "safesail_arch": c.arch, "safesail_name": c.name},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder
