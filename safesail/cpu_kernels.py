"""Whether this machine has fast bf16 matmuls, and the `${if_bf16_fast:A,B}` config resolver.

bf16 speed depends on the CPU, not on torch: with oneDNN's bf16 kernels (AVX-512 cores, AMX) a bf16
linear layer is faster than float32 (1.5-9x, BENCHMARKS.md), but on an AVX2-only CPU torch falls back to
a generic kernel that is ~5x *slower* than float32 (measured on a 2-core AMD EPYC without AVX-512:
8 vs 49 GFLOPS for a 2048x1536x8960 product at one thread; Qwen2.5-Coder-1.5B prefill 4.9 vs 25.6
tokens/s; BENCHMARKS.md, "Session 8"). So the YAML files that chose bf16 for CPU speed say
`${if_bf16_fast:bfloat16,float32}` (dtypes) or `${if_bf16_fast:true,false}` (autocast): the first value
where bf16 is fast (a machine with a CUDA GPU, or a CPU with oneDNN's bf16 path), the second elsewhere. The
run directory's config.yaml records the resolved value, and fingerprints see it too, so a run made on
one kind of machine is never mistaken for one made on another.
"""

from __future__ import annotations

import functools
import os

_OVERRIDE_ENV = "SAFESAIL_BF16_FAST"     # 1 / 0: force the answer (tests, or a machine the check misjudges)


@functools.lru_cache(maxsize=None)
def _detected() -> bool:
    import torch

    if torch.cuda.is_available():    # not is_bf16_supported(): that creates a CUDA context before any fork;
        return True                  # the trainer checks bf16 support itself when it sets up autocast
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except (RuntimeError, AttributeError):
        return False


def bf16_is_fast() -> bool:
    """True where bf16 matmuls run on native kernels: a machine with a CUDA GPU, or a CPU with oneDNN's bf16
    path (AVX-512 or AMX). $SAFESAIL_BF16_FAST=1/0 overrides the check (e.g. `device=cpu` on a GPU machine
    whose CPU lacks AVX-512: SAFESAIL_BF16_FAST=0)."""
    forced = os.environ.get(_OVERRIDE_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _detected()


def if_bf16_fast(fast, slow):
    """The `${if_bf16_fast:A,B}` resolver: A where bf16 is fast, else B."""
    return fast if bf16_is_fast() else slow


def register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("if_bf16_fast"):
        OmegaConf.register_new_resolver("if_bf16_fast", if_bf16_fast)
