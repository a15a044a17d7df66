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

_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard",
         "matryoshka_topk": "topk", "matryoshka_batchtopk": "jumprelu"}  # Matryoshka SAEs infer as their base
_TOPK = ("topk", "matryoshka_topk")
_BATCHTOPK = ("batchtopk", "matryoshka_batchtopk")


def hf_module_name(hook: str | None) -> str | None:
    if not hook:
        return None
    hp = HookPoint.parse(hook)
    return f"model.layers.{hp.layer}.mlp.down_proj" if hp.site == "mlp_out" else f"model.layers.{hp.layer}"


def export_saelens(sae: SAE, folder: str | Path, context_size: int | None = None) -> Path:
    """Write `sae` in SAELens's layout. BatchTopK exports as JumpReLU with its learned threshold for every latent."""
    c = sae.cfg
    if c.arch not in _ARCH:
        from safesail.errors import UserError

        raise UserError(f"SAELens has no layout for a {c.arch} SAE; export it with --format safesail instead.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": sae.W_enc.detach().cpu().t().contiguous(),
        "b_enc": sae.b_enc.detach().cpu().clone(),
        "W_dec": sae.W_dec.detach().cpu().clone(),
        "b_dec": sae.b_dec.detach().cpu().clone(),
    }
    if c.arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().cpu().clone()
    elif c.arch in _BATCHTOPK:
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
        "activation_fn_str": "topk" if c.arch in _TOPK else "relu",
        "activation_fn_kwargs": {"k": c.k} if c.arch in _TOPK else {},
        "k": c.k if c.arch in _TOPK else None,
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


# ---- import ---------------------------------------------------------------------------------------------

_FROM_ARCH = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}
WEIGHTS = "sae_weights.safetensors"


def is_saelens_folder(folder: Path) -> bool:
    return (folder / "cfg.json").is_file() and (folder / WEIGHTS).is_file()


def load_saelens(folder: str | Path, hook: str | None = None, model: str | None = None) -> SAE:
    """Read a SAELens folder (`cfg.json` + `sae_weights.safetensors`, 5.x flat or 6.x config) into our SAE.

    topk, jumprelu and standard (ReLU) SAEs import with the same codes and reconstruction;
    `apply_b_dec_to_input: false` is folded into the encoder bias and
    `rescale_acts_by_decoder_norm` into the weights. Runtime input normalisation cannot be folded
    and is refused.
    """
    import torch
    from safetensors.torch import load_file

    from safesail.errors import UserError
    from safesail.saes.config import SAEConfig
    from safesail.saes.registry import build_sae

    folder = Path(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no cfg.json; give a SAELens SAE folder (cfg.json + {WEIGHTS}).") from None
    except ValueError:
        raise UserError(f"{folder / 'cfg.json'} is not valid JSON; give a SAELens SAE folder.") from None
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} has no {WEIGHTS}; give a SAELens SAE folder (cfg.json + {WEIGHTS}).")
    arch = str(cfg.get("architecture", "standard"))
    if arch not in _FROM_ARCH:
        raise UserError(f"the SAELens SAE in {folder} has the {arch!r} architecture; Safe-SAIL imports "
                        f"{', '.join(sorted(_FROM_ARCH))}.")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise UserError(f"the SAELens SAE in {folder} normalises its input at run time ({norm!r}), which "
                        "Safe-SAIL's SAEs cannot do; fold the normalisation into the weights in SAELens first.")
    state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in state]
    if missing or (arch == "jumprelu" and "threshold" not in state and "log_threshold" not in state):
        raise UserError(f"{folder / WEIGHTS} lacks {(missing or ['threshold'])[0]!r} for a {arch} SAE; the folder "
                        "is damaged or from another tool.")
    w_enc, b_enc, w_dec, b_dec = state["W_enc"].t(), state["b_enc"], state["W_dec"], state["b_dec"]  # [n, d] rows
    n, d = w_enc.shape
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + w_enc @ b_dec   # (x - b_dec) @ W + (b_enc + b_dec @ W) == x @ W + b_enc
    if cfg.get("rescale_acts_by_decoder_norm"):
        scale = w_dec.norm(dim=1).clamp_min(1e-12)
        w_enc, b_enc, w_dec = w_enc * scale[:, None], b_enc * scale, w_dec / scale[:, None]
    ours = _FROM_ARCH[arch]
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    source = {"format": "saelens", "from": str(folder), "architecture": arch,
              "hook_name": cfg.get("hook_name") or meta.get("hook_name"),
              "model_name": cfg.get("model_name") or meta.get("model_name")}
    sae = build_sae(SAEConfig(arch=ours, d_in=int(d), n_latents=int(n), k=int(k) if ours == "topk" else None,
                              hook=hook, model=model, normalize=False, b_dec_init="zeros",
                              extra={"imported": source}))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
        if ours == "jumprelu":
            theta = state["threshold"] if "threshold" in state else state["log_threshold"].exp()
            sae.log_threshold.copy_(theta.reshape(n).clamp_min(1e-12).log())
    return sae.eval()


def saelens_hook_name(cfg_path: Path) -> str | None:
    """The hook name a SAELens cfg.json records (5.x flat, or 6.x under metadata)."""
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return cfg.get("hook_name") or meta.get("hook_name")
