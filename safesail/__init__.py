"""Safe-SAIL: map the safety landscape inside a chat LLM with sparse autoencoders."""

__version__ = "0.1.0"

from safesail.cpu_kernels import register_resolver as _register_resolver

_register_resolver()     # `${if_bf16_fast:A,B}` in the YAML files (safesail/cpu_kernels.py)
