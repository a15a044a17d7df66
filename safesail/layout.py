"""Every file name of a run directory, in one place (docs/contracts.md shows the tree).

```
runs/<name>/
  config.yaml                        CONFIG: the resolved config of the last command
  pipeline.json                      PIPELINE_SUMMARY: per-stage wall time of `safesail run`
  stages/<stage>.json                STAGES_DIR: completion record + fingerprint of each stage
  activations/<hook>/                ACTIVATIONS_DIR: cache shards + CACHE_META (meta.json)
  saes/sweep.json                    SWEEP_SUMMARY
  saes/<hook>/<arch>-k<k>/           SAE_CFG, SAE_WEIGHTS, SAE_METRICS
  selection.json, selection.png      SELECTION, SELECTION_PLOT (per-SAE figures under selection/)
  latents/<hook>/                    LATENT_STATS, LATENT_SEGMENTS, LATENT_META
  interpret/                         EXPLANATIONS, SCORES, TAGS, LLM_CACHE
  verify/                            EFFECTS
  neurons.sqlite                     NEURON_DB
  export/                            EN_DB, NEURONS_JSONL, VERIFY_EXPORT, indices_layer{L}.pt, quantile_layer{L}.pt
```
`safesail.rundir.RunDir` turns these names into paths; a module that reads or writes a
run's file asks RunDir (or uses these names) instead of spelling the name itself.
"""

from __future__ import annotations

CONFIG = "config.yaml"
PIPELINE_SUMMARY = "pipeline.json"
STAGES_DIR = "stages"

ACTIVATIONS_DIR = "activations"
CACHE_META = "meta.json"

SAES_DIR = "saes"
SWEEP_SUMMARY = "sweep.json"
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae.safetensors"
SAE_METRICS = "metrics.json"

SELECTION = "selection.json"
SELECTION_PLOT = "selection.png"
SELECTION_DIR = "selection"

LATENTS_DIR = "latents"
LATENT_STATS = "stats.safetensors"
LATENT_SEGMENTS = "segments.jsonl"
LATENT_META = "meta.json"

INTERPRET_DIR = "interpret"
EXPLANATIONS = "explanations.jsonl"
SCORES = "scores.jsonl"
TAGS = "tags.jsonl"
LLM_CACHE = "llm_cache.sqlite"

VERIFY_DIR = "verify"
EFFECTS = "effects.jsonl"

NEURON_DB = "neurons.sqlite"

EXPORT_DIR = "export"
EN_DB = "en_db.json"
NEURONS_JSONL = "neurons.jsonl"
VERIFY_EXPORT = "verify.jsonl"


def release_indices(layer: int) -> str:
    """Safe-SAIL's per-layer latent-index file of an export."""
    return f"indices_layer{int(layer)}.pt"


def release_quantiles(layer: int) -> str:
    """Safe-SAIL's per-layer top/bottom activation table of an export."""
    return f"quantile_layer{int(layer)}.pt"
