"""SAEConfig: what defines one sparse autoencoder (architecture, size, sparsity, training knobs).

It is saved as `cfg.json` next to the weights, so a folder is self-describing.
Folder names (`SAEConfig.name`) follow one scheme:

| arch        | sparsity knob              | folder name              |
|-------------|----------------------------|--------------------------|
| `topk`      | `k` latents per token      | `topk-k32`               |
| `batchtopk` | `k` per token on average   | `batchtopk-k32`          |
| `jumprelu`  | `l0_coef` (L0 penalty)     | `jumprelu-l0_0.001`      |
| `relu`      | `l1_coef` (L1 penalty)     | `relu-l1_0.05`           |
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from safesail.errors import UserError

K_ARCHS = ("topk", "batchtopk")
ARCHS = ("topk", "batchtopk", "jumprelu", "relu")


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass
class SAEConfig:
    arch: str = "topk"
    d_in: int = 0
    n_latents: int = 0
    k: int | None = None              # topk / batchtopk: active latents per token
    l1_coef: float | None = None      # relu: weight of the decoder-norm-weighted L1 penalty
    l0_coef: float | None = None      # jumprelu: weight of the L0 penalty
    bandwidth: float = 0.001          # jumprelu: width of the straight-through kernel (normalised units)
    init_threshold: float = 0.001     # jumprelu: initial threshold (normalised units)
    hook: str | None = None           # e.g. layers.7.mlp_out
    model: str | None = None          # source model name
    # training knobs (recorded so a folder says how it was made)
    lr: float | None = None           # None: 2e-4 / sqrt(n_latents / 2**14)
    seed: int = 0
    auxk_alpha: float = 1 / 32        # weight of the AuxK loss on dead latents (0 turns it off)
    k_aux: int | None = None          # None: d_in // 2
    b_dec_init: str = "geometric_median"  # geometric_median | mean | zeros
    normalize: bool = True            # train on activations scaled to unit mean squared norm
    input_scale: float = 1.0          # the scale used in training, already folded into the saved weights
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived ---------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.arch in K_ARCHS:
            return f"{self.arch}-k{self.k}"
        if self.arch == "jumprelu":
            return f"jumprelu-l0_{_fmt(self.l0_coef)}"
        if self.arch == "relu":
            return f"relu-l1_{_fmt(self.l1_coef)}"
        return self.arch

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.n_latents / 2 ** 14)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in d.items() if k in names}
        cfg = cls(**known)
        cfg.extra = {**cfg.extra, **{k: v for k, v in d.items() if k not in names and k != "format"}}
        return cfg

    def validate(self) -> "SAEConfig":
        """Check the config; raise UserError (one sentence) on a mistake. Fills defaults."""
        if self.arch not in ARCHS:
            raise UserError(f"SAE architecture {self.arch!r} is unknown; use one of {', '.join(ARCHS)}.")
        if self.d_in <= 0 or self.n_latents <= 0:
            raise UserError(f"SAE {self.name} needs positive d_in and n_latents (got {self.d_in}, {self.n_latents}).")
        if self.arch in K_ARCHS:
            if self.k is None or int(self.k) < 1:
                raise UserError(f"SAE architecture {self.arch} needs k >= 1; set k in the sweep config.")
            self.k = int(self.k)
            if self.k > self.n_latents:
                raise UserError(f"k={self.k} is larger than the SAE width ({self.n_latents} latents); "
                                "choose a smaller k or a wider SAE.")
        else:
            self.k = None
        if self.arch == "relu":
            self.l1_coef = float(self.l1_coef if self.l1_coef is not None else 0.05)
            if self.l1_coef < 0:
                raise UserError("l1_coef must be >= 0.")
        if self.arch == "jumprelu":
            self.l0_coef = float(self.l0_coef if self.l0_coef is not None else 0.001)
            if self.l0_coef < 0 or self.bandwidth <= 0:
                raise UserError("jumprelu needs l0_coef >= 0 and bandwidth > 0.")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise UserError(f"b_dec_init {self.b_dec_init!r} is unknown; use geometric_median, mean or zeros.")
        return self
