"""SAEConfig: what defines one sparse autoencoder (architecture, size, sparsity, training knobs).

It is saved as `cfg.json` next to the weights, so a folder is self-describing. The fields
common to every architecture are the dataclass fields below; each architecture adds its own
(`k`, `l1_coef`, ...) in its file under `safesail/saes/archs/`, as a `Params` dataclass, and
owns its folder name and validation. Those fields read and write as attributes (`cfg.k`)
and sit flat in cfg.json beside the common ones.

| arch         | its own fields                        | folder name              |
|--------------|---------------------------------------|--------------------------|
| `topk`       | `k` latents per token                 | `topk-k32`               |
| `batchtopk`  | `k` per token on average              | `batchtopk-k32`          |
| `matryoshka` | `k`, `groups` (nested prefix sizes)   | `matryoshka-k32`         |
| `jumprelu`   | `l0_coef`, `bandwidth`, `init_threshold` | `jumprelu-l0_0.001`   |
| `relu`       | `l1_coef`                             | `relu-l1_0.05`           |
| `pursuit`    | `k`, `rounds` (greedy rounds, default k) | `pursuit-k32-r4`      |
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from safesail.errors import UserError

OPTIMIZERS = ("adam", "signum", "auto")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DEC_INITS = ("data", "random")
ENC_INITS = ("decoder", "decoder_scaled")


def _arch_class(arch: str):
    from safesail.saes.registry import arch_class  # late: the architectures import this module

    return arch_class(arch)


def _param_names(arch: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(_arch_class(arch).Params))


def default_lr(n_latents: int, optimizer: str = "signum") -> float:
    """The learning-rate rule (docs/training.md): 1/sqrt(n / 2^14) in the width (Gao et al., sparsify);
    base 5e-3 for signum (sparsify's), 1.6e-3 for Adam (8x sparsify's Adam rule: better in the short runs measured).
    `auto` is resolved to one of them by the trainer before this is read (unresolved: signum's)."""
    base = 1.6e-3 if optimizer == "adam" else 5e-3
    return base / math.sqrt(n_latents / 2 ** 14)


@dataclass(init=False)
class SAEConfig:
    arch: str = "topk"
    d_in: int = 0
    n_latents: int = 0
    hook: str | None = None           # e.g. layers.7.mlp_out
    model: str | None = None          # source model name
    # training knobs (recorded so a folder says how it was made)
    lr: float | None = None           # None: default_lr(n_latents, optimizer)
    optimizer: str = "signum"         # signum (schedule-free sign descent) | adam | auto (by run length); safesail/train/optim.py
    seed: int = 0
    enc_init: str = "decoder_scaled"  # decoder: W_enc = W_dec; decoder_scaled: W_enc = W_dec * enc_init_scale
    enc_init_scale: float = 1 / math.sqrt(3)
    auxk_alpha: float = 1 / 32        # weight of the AuxK loss on dead latents (0 turns it off)
    k_aux: int | None = None          # None: d_in // 2
    b_dec_init: str = "mean"          # mean | geometric_median | zeros (of the first batch)
    dec_init: str = "random"          # random | data: decoder rows start at first-batch rows (safesail/train/data_init.py)
    normalize: bool = True            # train on activations scaled to unit mean squared norm
    input_scale: float = 1.0          # the scale used in training, already folded into the saved weights
    extra: dict[str, Any] = field(default_factory=dict)

    def __init__(self, arch: str = "topk", **kw: Any):
        common = {f.name: f for f in dataclasses.fields(type(self))}
        object.__setattr__(self, "params", {})
        object.__setattr__(self, "_checked", False)
        for name, f in common.items():
            if name == "arch":
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            object.__setattr__(self, name, kw.pop(name, default))
        object.__setattr__(self, "arch", arch)
        own = _param_names(arch) if _known(arch) else ()
        if _known(arch):
            self.params.update(dataclasses.asdict(_arch_class(arch).Params()))
        for k, v in kw.items():
            if k in own:
                self.params[k] = v
            elif k not in _all_param_names():
                raise TypeError(f"SAEConfig got an unknown field {k!r}")
            elif v is not None:
                raise UserError(f"SAE architecture {arch} has no setting {k!r}; its settings are "
                                f"{', '.join(own) or 'none'}.")

    # attribute access to the architecture's own fields
    def __getattr__(self, name: str) -> Any:
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, "_checked", False)
        if name in self.__dict__.get("params", {}):
            self.params[name] = value
        else:
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return "SAEConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SAEConfig) and self.to_dict() == other.to_dict()

    # ---- derived ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return _arch_class(self.arch).folder_name(self)

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else default_lr(self.n_latents, self.optimizer)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        extra = d.pop("extra")
        if d["dec_init"] == "random":   # the only init before the field existed: left out, so that a cfg.json
            del d["dec_init"]           # and the fingerprints of SAEs trained then stay the same
        d.update(self.params)
        d["extra"] = dict(extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """From cfg.json (lenient: unknown keys go to `extra`, other architectures' fields are dropped)."""
        d = dict(d)
        d.setdefault("dec_init", "random")   # written before dec_init existed, or random (see to_dict)
        arch = d.pop("arch", "topk")
        common = {f.name for f in dataclasses.fields(cls)} - {"arch"}
        own = set(_param_names(arch)) if _known(arch) else set()
        others = _all_param_names()
        kw = {k: v for k, v in d.items() if k in common or k in own}
        extra = {k: v for k, v in d.items() if k not in common and k not in own and k not in others and k != "format"}
        cfg = cls(arch, **kw)
        cfg.extra = {**cfg.extra, **extra}
        return cfg

    @classmethod
    def entry_keys(cls, arch: str) -> tuple[str, ...]:
        """The keys a sweep entry of `arch` may set."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "input_scale", "hook",
                                                                                "model", "d_in")) + _param_names(arch)

    @classmethod
    def sequence_keys(cls, arch: str) -> tuple[str, ...]:
        """The architecture's list-valued settings (a sweep grids over them only as a list of lists)."""
        return tuple(f.name for f in dataclasses.fields(_arch_class(arch).Params)
                     if isinstance(f.default, (tuple, list)))

    def validate(self) -> "SAEConfig":
        """Check the config; raise UserError (one sentence) on a mistake. Runs once until a field changes."""
        if self.__dict__.get("_checked"):
            return self
        if not _known(self.arch):
            from safesail.saes.registry import arch_names

            raise UserError(f"SAE architecture {self.arch!r} is unknown; use one of {', '.join(arch_names())}.")
        self._coerce()
        if self.d_in <= 0 or self.n_latents <= 0:
            raise UserError(f"SAE {self.arch} needs positive d_in and n_latents (got {self.d_in}, {self.n_latents}).")
        if self.b_dec_init not in B_DEC_INITS:
            raise UserError(f"b_dec_init {self.b_dec_init!r} is unknown; use {', '.join(B_DEC_INITS)}.")
        if self.dec_init not in DEC_INITS:
            raise UserError(f"dec_init {self.dec_init!r} is unknown; use {', '.join(DEC_INITS)}.")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer {self.optimizer!r} is unknown; use {', '.join(OPTIMIZERS)}.")
        if self.enc_init not in ENC_INITS:
            raise UserError(f"enc_init {self.enc_init!r} is unknown; use {', '.join(ENC_INITS)}.")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"lr must be > 0 (got {self.lr}); leave it null for the default rule.")
        _arch_class(self.arch).check_config(self)
        object.__setattr__(self, "_checked", True)
        return self


    def _coerce(self) -> None:
        """Typed common fields; a value of the wrong type is one sentence naming the key."""
        types = {"d_in": int, "n_latents": int, "seed": int, "lr": float, "enc_init_scale": float,
                 "auxk_alpha": float, "k_aux": int, "input_scale": float}
        for key, typ in types.items():
            v = getattr(self, key)
            if v is None and key in ("lr", "k_aux"):
                continue
            try:
                if isinstance(v, bool) or (typ is int and isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                object.__setattr__(self, key, typ(v))
            except (TypeError, ValueError):
                raise UserError(f"SAE setting {key}={v!r} is not {'an integer' if typ is int else 'a number'}; "
                                "fix it in the sweep or train config.") from None
        if not isinstance(self.normalize, bool):
            raise UserError(f"SAE setting normalize={self.normalize!r} is not true/false; fix it in the train config.")


def _known(arch: str) -> bool:
    from safesail.saes.registry import ARCH_CLASSES, discover

    discover()
    return arch in ARCH_CLASSES


def _all_param_names() -> set[str]:
    from safesail.saes.registry import ARCH_CLASSES, discover

    discover()
    return {f.name for c in ARCH_CLASSES.values() for f in dataclasses.fields(c.Params)}


def k_archs() -> tuple[str, ...]:
    """Registered architectures with a `k` (the `sae.k` override applies to them)."""
    from safesail.saes.registry import ARCH_CLASSES, discover

    discover()
    return tuple(a for a, c in ARCH_CLASSES.items() if "k" in {f.name for f in dataclasses.fields(c.Params)})
