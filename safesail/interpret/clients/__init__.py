"""LLM clients: one interface (base.py), an OpenAI-compatible HTTP back end, a local
in-process transformers back end, and an SQLite response cache shared by both."""

from safesail.interpret.clients.base import (ChatRequest, Completion, LLMClient, LLMError, PromptLogprobs,
                                             make_client)

__all__ = ["ChatRequest", "Completion", "LLMClient", "LLMError", "PromptLogprobs", "make_client"]
