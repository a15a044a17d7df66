"""Sparse autoencoders: architectures, files, and format converters.

```python
from safesail.saes import load_sae, list_saes
sae = load_sae("runs/demo/saes/layers.7.mlp_out/topk-k32")
z = sae.encode(acts)          # [n, n_latents], >= 0, raw activation units
recon = sae(acts)             # decode(encode(acts))
```
Architectures: one file each in `safesail/saes/archs/`, registered by `@register_arch`.
"""

from safesail.saes.base import SAE, SAEOutput
from safesail.saes.config import SAEConfig, k_archs
from safesail.saes.io import list_saes, load_sae, read_cfg, read_metrics, save_sae
from safesail.saes.registry import ARCH_CLASSES, arch_class, arch_names, build_sae, discover, register_arch

discover()
ARCHS = tuple(arch_names())
K_ARCHS = k_archs()

__all__ = ["ARCHS", "ARCH_CLASSES", "K_ARCHS", "SAE", "SAEConfig", "SAEOutput", "arch_class", "arch_names",
           "build_sae", "k_archs", "list_saes", "load_sae", "read_cfg", "read_metrics", "register_arch", "save_sae"]
