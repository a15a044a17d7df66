"""The LLM client interface shared by the explain and score stages.

Two back ends implement it (`openai_http.OpenAIClient`, `local.LocalClient`);
`make_client(llm_cfg, cache_path)` builds one from a `configs/llm/*.yaml`
group and wraps it in the on-disk SQLite response cache (`cache.CachedClient`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class LLMError(Exception):
    """A failed LLM call; `reason` is a short machine-readable word.

    Reasons: timeout, rate_limited, server_error, bad_request, empty_reply,
    connection, auth, context_overflow, unsupported, other.
    """

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int = 256
    temperature: float = 0.0
    json_schema: dict | None = None
    stop: list[str] | None = None


@dataclass
class Completion:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    raw: dict | None = None


@dataclass
class PromptLogprobs:
    """`next_logprobs[i]`: log-probability of each requested candidate string being
    the token that FOLLOWS prompt token `i`. Exact for every candidate with the
    local back end; through an API only the server's top-N, missing candidates absent."""

    tokens: list[str]
    next_logprobs: list[dict[str, float]]
    prompt_tokens: int
    cached: bool = False


class LLMClient(ABC):
    model_name: str = ""
    supports_prompt_logprobs: bool = False
    context_window: int = 2048

    @abstractmethod
    async def chat(self, req: ChatRequest) -> Completion:
        ...

    async def prompt_logprobs(self, prompt: str, candidates: list[str]) -> PromptLogprobs:
        raise LLMError("unsupported", f"{type(self).__name__} cannot return prompt log-probabilities")

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        ...

    def count_message_tokens(self, messages: list[dict]) -> int:
        """Approximate prompt size of a chat request (content tokens + a few per message)."""
        return sum(self.count_tokens(str(m.get("content", ""))) + 4 for m in messages) + 2

    async def ensure_ready(self) -> None:
        """Anything to do before the first call (e.g. ask a server for its model name)."""
        return None

    def cache_identity(self) -> dict[str, Any]:
        """What identifies this back end in the response cache key."""
        return {"backend": type(self).__name__, "model": self.model_name}

    async def aclose(self) -> None:
        return None


@dataclass
class CallStats:
    calls: int = 0
    hits: int = 0
    misses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.calls if self.calls else 0.0


def make_client(llm_cfg, cache_path: Path | None = None, cache_dir: str | Path | None = None,
                device: str = "cpu") -> LLMClient:
    """Build the client named by `llm_cfg.backend` (local | openai), wrapped in the response cache."""
    from safesail.errors import UserError

    backend = str(llm_cfg.get("backend", "local"))
    if backend == "local":
        from safesail.interpret.clients.local import LocalClient

        client: LLMClient = LocalClient.from_cfg(llm_cfg, cache_dir=cache_dir, device=device)
    elif backend in ("openai", "http"):
        from safesail.interpret.clients.openai_http import OpenAIClient

        client = OpenAIClient.from_cfg(llm_cfg)
    else:
        raise UserError(f"unknown llm.backend {backend!r}; use local or openai (any OpenAI-compatible server).")
    if cache_path is None or not llm_cfg.get("cache", True):
        return client
    from safesail.interpret.clients.cache import CachedClient

    return CachedClient(client, Path(cache_path))
