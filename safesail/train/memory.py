"""Memory of SAE training: what each SAE holds by formula, and a count of what it does hold.

Per SAE of `n` latents on `d` inputs, `P = 2 n d + n + d` float32 parameters (4 bytes each):

| part | bytes | held |
|---|---|---|
| weights | 4 P | the whole run |
| optimiser state | 4 P (signum: z) or 8 P (Adam: two moments) | the whole run |
| gradients | 4 P | only during that SAE's step (set to None after it) |
| step buffers | b n (4, or 2 under bf16 autocast: the pre-activations) + ~40 b k + 8 n d (AuxK's full-size gradient parts) | only during the step |
| exported copy | 4 P | from the end of training; the training state is released as each SAE is exported |

So a sweep of S SAEs holds `S (4 + 4 s) P` (s = 1 signum, 2 Adam) plus, for the
`sae_threads` SAEs stepping at once, their gradients and step buffers
(`train_peak_bytes`); the data reader's buffer and the model are outside this count.
docs/training.md has the measured figures (benchmarks/bench_train.py --memory).
"""

from __future__ import annotations

from typing import Any

import torch

FLOAT = 4


def param_count(n: int, d: int) -> int:
    return 2 * n * d + n + d


def optimizer_states(optimizer: str) -> int:
    """Weight-sized state tensors the optimiser keeps per parameter."""
    return 2 if optimizer == "adam" else 1


def resident_bytes(n: int, d: int, optimizer: str = "signum") -> dict[str, int]:
    """What one SAE holds for the whole run (weights, optimiser state)."""
    p = param_count(n, d)
    return {"weights": FLOAT * p, "optimizer": FLOAT * p * optimizer_states(optimizer)}


def step_bytes(n: int, d: int, batch: int, k: int, bf16: bool = False) -> dict[str, int]:
    """An upper estimate of one TopK step's extra memory: gradients and the largest buffers."""
    return {"gradients": FLOAT * param_count(n, d), "pre_activations": batch * n * (2 if bf16 else FLOAT),
            "sparse_codes": 40 * batch * k, "auxk_gradient_parts": 2 * FLOAT * n * d}


def train_peak_bytes(n: int, d: int, n_saes: int, batch: int, k: int, optimizer: str = "signum",
                     sae_threads: int = 1, bf16: bool = False) -> int:
    """Bound on the SAE part of training memory: every SAE's resident state plus `sae_threads` steps."""
    per = sum(resident_bytes(n, d, optimizer).values())
    return n_saes * per + min(sae_threads, n_saes) * sum(step_bytes(n, d, batch, k, bf16).values())


def held_bytes(sae: torch.nn.Module, opt: Any | None) -> dict[str, int]:
    """The bytes a training state holds now: weights, gradients, optimiser state tensors."""
    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    params = list(sae.parameters())
    state = 0
    if opt is not None:
        for st in opt.state.values():
            state += sum(size(v) for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"weights": sum(size(p) for p in params), "gradients": sum(size(p.grad) for p in params
                                                                       if p.grad is not None),
            "optimizer": state}
