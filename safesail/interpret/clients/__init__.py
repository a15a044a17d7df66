"""LLM clients: one interface (base.py), an OpenAI-compatible HTTP back end, a local
in-process transformers back end (each registered by its `llm.backend` name in
registry.py), and an SQLite response cache shared by both."""

from safesail.interpret.clients.base import ChatRequest, Completion, LLMClient, LLMError, PromptLogprobs
from safesail.interpret.clients.registry import make_client

__all__ = ["ChatRequest", "Completion", "LLMClient", "LLMError", "PromptLogprobs", "make_client"]
