"""Other tools' SAE layouts: which formats exist, how their hook names map to ours, and where they sit.

| format    | one SAE is                                   | module             |
|-----------|----------------------------------------------|--------------------|
| saelens   | a folder: cfg.json + sae_weights.safetensors | saes/saelens.py    |
| sparsify  | a hookpoint folder: cfg.json + sae.safetensors (EleutherAI sparsify) | saes/sparsify_layout.py |
| safesail  | a file: ckpt_layer{L}.pt (Safe-SAIL's release) | saes/safesail_layout.py |

`find_saes(fmt, path)` lists the SAEs under a path with the hook each one names;
`load_foreign(fmt, path, hook, ...)` reads one into our SAE; `export_foreign(fmt, sae, dest)`
writes one. The CLI around them is `saes/interop_stage.py` (`safesail saes import|export`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safesail.domains import SAFESAIL_K  # Safe-SAIL's released TopK SAEs keep 200 latents per token
from safesail.errors import UserError
from safesail.hooks import HookPoint
from safesail.saes.base import SAE

FORMATS = ("saelens", "sparsify", "safesail")

# Hook names other tools write -> our (layer, site).
_HOOK_PATTERNS = [
    (re.compile(r"^layers\.(\d+)\.(mlp_out|resid)$"), None),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp_out"),          # TransformerLens (SAELens)
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid"),
    (re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp(?:\.down_proj)?$"), "mlp_out"),  # Hugging Face modules (sparsify)
    (re.compile(r"^(?:model\.)?layers\.(\d+)$"), "resid"),
]
_CKPT = re.compile(r"^ckpt_layer(\d+)\.pt$")


def our_hook(name: str | None, default_site: str = "mlp_out") -> str | None:
    """Our hook name for another tool's (None when it names no layer we know)."""
    if not name:
        return None
    m = _CKPT.match(name)
    if m:
        return HookPoint(int(m.group(1)), default_site).name
    for pattern, site in _HOOK_PATTERNS:
        m = pattern.match(str(name).strip())
        if m:
            return HookPoint(int(m.group(1)), site or m.group(2)).name
    return None


def sparsify_hookpoint(hook: str) -> str:
    """sparsify's hookpoint name (a module of the base model) for our hook."""
    hp = HookPoint.parse(hook)
    return f"layers.{hp.layer}.mlp" if hp.site == "mlp_out" else f"layers.{hp.layer}"


@dataclass
class Found:
    path: Path            # the folder (saelens, sparsify) or file (safesail) of one SAE
    hook: str | None      # our hook name, when the files tell it


def find_saes(fmt: str, path: Path, default_site: str = "mlp_out") -> list[Found]:
    """Every SAE of format `fmt` at `path` (the SAE itself, or a folder holding several)."""
    from safesail.saes.saelens import is_saelens_folder, saelens_hook_name
    from safesail.saes.sparsify_layout import is_sparsify_folder

    check_format(fmt)
    if not path.exists():
        raise UserError(f"{path} does not exist; give the folder or file of the {fmt} SAE to import.")
    if fmt == "safesail":
        files = [path] if path.is_file() else sorted(p for p in path.glob("ckpt_layer*.pt"))
        return [Found(p, our_hook(p.name, default_site)) for p in files]
    is_one = is_saelens_folder if fmt == "saelens" else is_sparsify_folder
    folders = [path] if is_one(path) else sorted(p for p in path.iterdir() if p.is_dir() and is_one(p)) \
        if path.is_dir() else []
    out = []
    for f in folders:
        named = saelens_hook_name(f / "cfg.json") if fmt == "saelens" else None
        out.append(Found(f, our_hook(named) or our_hook(f.name)))
    return out


def load_foreign(fmt: str, path: Path, hook: str, model: str | None, k: int | None = None) -> SAE:
    check_format(fmt)
    if fmt == "saelens":
        from safesail.saes.saelens import load_saelens

        return load_saelens(path, hook=hook, model=model)
    if fmt == "sparsify":
        from safesail.saes.sparsify_layout import load_sparsify

        return load_sparsify(path, hook=hook, model=model)
    from safesail.saes.safesail_layout import load_safesail_checkpoint

    sae = load_safesail_checkpoint(path, k=k or SAFESAIL_K, hook=hook, model=model)
    sae.cfg.extra = {**(sae.cfg.extra or {}), "imported": {"format": "safesail", "from": str(path)}}
    return sae


def export_foreign(fmt: str, sae: SAE, dest: Path) -> Path:
    """Write `sae` in format `fmt` at `dest` (a folder for saelens/sparsify, a .pt file for safesail)."""
    check_format(fmt)
    if fmt == "saelens":
        from safesail.saes.saelens import export_saelens

        return export_saelens(sae, dest)
    if fmt == "sparsify":
        from safesail.saes.sparsify_layout import export_sparsify

        return export_sparsify(sae, dest)
    from safesail.saes.safesail_layout import save_safesail_checkpoint

    if sae.cfg.arch not in ("topk", "jumprelu", "batchtopk", "matryoshka_topk", "matryoshka_batchtopk"):
        raise UserError(f"Safe-SAIL's checkpoint layout holds TopK or JumpReLU SAEs, and this one is "
                        f"{sae.cfg.arch}; export it with --format saelens instead.")
    return save_safesail_checkpoint(sae, dest)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown SAE format {fmt!r}; use one of {', '.join(FORMATS)}.")
