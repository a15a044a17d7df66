"""Load a source model + tokenizer from a model config (configs/model/*.yaml)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from safesail.errors import UserError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str | None = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} was asked for but no CUDA GPU is visible; use device=cpu or device=auto.")
    return dev


def resolve_dtype(name: str | None, device: torch.device | None = None) -> torch.dtype:
    if name in (None, "auto"):
        if device is not None and device.type == "cuda":
            return torch.bfloat16
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPES))} or auto.") from None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str           # the config's model name (recorded in every artifact)
    path: str           # the folder or hub id it was loaded from
    num_layers: int
    hidden_size: int
    device: torch.device
    dtype: torch.dtype


def model_folder(cfg: DictConfig, cache_dir: str | os.PathLike) -> str:
    """Where the weights come from: a local folder or a hub id (only for source=hf)."""
    source = cfg.get("source", "hf")
    from safesail.models.embedded import EMBEDDED, ensure_embedded

    if source in EMBEDDED:
        return str(ensure_embedded(source, cache_dir))
    if source == "tiny":
        from safesail.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(cfg, Path(cache_dir)))
    if source == "hf":
        if not cfg.get("path"):
            raise UserError("model.path is empty; set it to a Hugging Face hub id or a local model folder.")
        return str(cfg.path)
    raise UserError(f"unknown model.source {source!r}; use hf, tiny or one of the embedded models "
                    f"({', '.join(EMBEDDED)}).")


def _contiguous(_module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def contiguous_head_input(model: torch.nn.Module) -> None:
    """Feed the unembedding a contiguous input. transformers slices the last position(s) of the hidden
    states (`logits_to_keep`, every `generate` prefill), a strided view, and torch's CPU bf16 linear on a
    strided input was ~500x slower and allocated GBs (Qwen2.5-Coder-0.5B: 57 s and 12.5 GiB vs 0.12 s for
    48 rows; SmolLM2: 6.4 s vs 0.02 s; BENCHMARKS.md issue 15, session 4 SECOND-SOURCE). Same values."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_safesail_contiguous", False):
        head.register_forward_pre_hook(_contiguous)
        head._safesail_contiguous = True


def load_model(cfg: DictConfig, device: str | torch.device = "auto", cache_dir: str | os.PathLike | None = None,
               dtype: str | None = None) -> LoadedModel:
    """Load the model described by a `model` config group for inference (eval mode, no grad)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = resolve_dtype(dtype or cfg.get("dtype"), dev)
    cache_dir = cache_dir or os.environ.get("SAFESAIL_CACHE", Path.home() / ".cache" / "safesail")
    path = model_folder(cfg, cache_dir)
    local = Path(path).exists()
    if not local and (os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in path):
        raise UserError(f"model path {path!r} is neither a local folder nor a usable hub id; "
                        "give model.path a folder holding config.json or a hub id like Qwen/Qwen2.5-3B-Instruct.")
    if local and not (Path(path) / "config.json").exists():
        raise UserError(f"model folder {path} has no config.json; point model.path at a Hugging Face model folder.")
    kw = dict(revision=cfg.get("revision"), trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kw)
    except OSError as e:
        raise UserError(f"could not load model {path!r} ({str(e).splitlines()[0][:200]}); check model.path "
                        "and, for a hub id, that you are online or have it in the local HF cache.") from None
    model.to(dev).eval()
    model.requires_grad_(False)
    contiguous_head_input(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    mc = model.config
    text_cfg = getattr(mc, "text_config", None) or mc
    return LoadedModel(model=model, tokenizer=tok, name=str(cfg.get("name") or path), path=path,
                       num_layers=int(text_cfg.num_hidden_layers), hidden_size=int(text_cfg.hidden_size),
                       device=dev, dtype=torch_dtype)
