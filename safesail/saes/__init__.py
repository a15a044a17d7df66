"""Sparse autoencoders: architectures, files, and format converters.

```python
from safesail.saes import load_sae, list_saes
sae = load_sae("runs/demo/saes/layers.7.mlp_out/topk-k32")
z = sae.encode(acts)          # [n, n_latents], >= 0, raw activation units
recon = sae(acts)             # decode(encode(acts))
```
"""

from safesail.saes.base import SAE, SAEOutput
from safesail.saes.config import ARCHS, K_ARCHS, SAEConfig
from safesail.saes.io import list_saes, load_sae, read_cfg, read_metrics, save_sae
from safesail.saes.registry import ARCH_CLASSES, build_sae

__all__ = ["ARCHS", "ARCH_CLASSES", "K_ARCHS", "SAE", "SAEConfig", "SAEOutput", "build_sae", "list_saes",
           "load_sae", "read_cfg", "read_metrics", "save_sae"]
