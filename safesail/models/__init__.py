"""Source models: any Hugging Face causal LM, the embedded SmolLM2 default, a tiny random model."""

from safesail.models.loading import LoadedModel, load_model, resolve_device, resolve_dtype

__all__ = ["LoadedModel", "load_model", "resolve_device", "resolve_dtype"]
