"""Safe-SAIL: map the safety landscape inside a chat LLM with sparse autoencoders."""

__version__ = "0.1.0"
