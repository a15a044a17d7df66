"""Shared facts: the safety domains, the score cut and Safe-SAIL's release constants.

Every module that needs one of these imports it from here (the diagnose page reads the
domains from `/api/info`). A value a user may change (the export's score cut, the
selection's domains) is also a config key; the constant here is its documented default
and what code falls back to when the key is absent.
"""

from __future__ import annotations

from typing import Literal

# The four safety domains of Safe-SAIL's neuron database, in their display order.
DOMAINS: tuple[str, ...] = ("politics", "pornography", "violence", "terror")
Domain = Literal["politics", "pornography", "violence", "terror"]

# Safe-SAIL keeps an explanation in its release when its score (the Pearson correlation
# between simulated and true activations) is at least this (db.export.score_cut).
SCORE_CUT = 0.2

# Safe-SAIL's release (reference/safe-sail-artifacts.md): TopK SAEs with k=200 on the MLP
# output of Qwen2.5-3B-Instruct (36 layers), activations normalised by each latent's 0.999
# quantile over the top-k table of 200,000 tokens.
SAFESAIL_K = 200
SAFESAIL_MODEL = "qwen2.5-3b-instruct"
SAFESAIL_NUM_LAYERS = 36
SAFESAIL_QUANTILE = 0.999
SAFESAIL_NUM_TOKENS = 200_000
SAFESAIL_ARCH = "topk"
SAFESAIL_HOOK_SITE = "mlp_out"

