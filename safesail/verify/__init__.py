"""Causal checks on a live model: steer, clamp and ablate SAE latents; refusal scores.

- `records`: the `verify/effects.jsonl` record (one reader, one writer).
- `interventions`: the edits at a hooked layer, used by the verify stage, the API and the CLI.
- `refusal`: the refusal score of an answer (refusal-opening log-probability, phrase check).
"""
