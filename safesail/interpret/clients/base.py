"""The LLM client interface shared by the explain and score stages.

Two back ends implement it (`openai_http.OpenAIClient`, `local.LocalClient`), each registered
by its `llm.backend` name; `registry.make_client(llm_cfg, cache_path)` builds one from a
`configs/llm/*.yaml` group and wraps it in the on-disk SQLite response cache (`cache.CachedClient`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


# Failures to get a reply at all: the server or the network, not the model. A back end retries
# them with backoff during a call, and a stage re-run sends the request again. `truncated_reply`:
# an HTTP 200 whose body is not the whole JSON reply; `empty_reply`: a reply with no text.
TRANSPORT_FAILURES = frozenset({"timeout", "rate_limited", "server_error", "connection", "truncated_reply",
                                "empty_reply"})


def is_transport_failure(reason: str | None) -> bool:
    """True for failures of the transport (retry them); False for the model's or the request's own."""
    return reason in TRANSPORT_FAILURES


class LLMError(Exception):
    """A failed LLM call; `reason` is a short machine-readable word.

    Reasons: the TRANSPORT_FAILURES above, and bad_request, auth, context_overflow,
    unsupported, other (not retried by a back end).
    """

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message

    @property
    def transport(self) -> bool:
        return is_transport_failure(self.reason)


@dataclass
class ChatRequest:
    """One chat call. `json_schema`: a bare JSON schema of the reply, or OpenAI's
    `{"name", "strict", "schema"}` object (sent as it is). `attempt`: 0 for the first try; a
    stage that asks again after a reply it could not use sets 1, 2, ... so that the response
    cache does not hand back the same reply (back ends ignore it)."""

    messages: list[dict]
    max_tokens: int = 256
    temperature: float = 0.0
    json_schema: dict | None = None
    stop: list[str] | None = None
    attempt: int = 0


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
    local back end; through an API only the server's top-N, missing candidates absent.
    Asked with `slots_ending_with`, the local back end computes only the positions whose
    token text ends with that string (`{}` elsewhere)."""

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

    async def prompt_logprobs(self, prompt: str, candidates: list[str],
                              slots_ending_with: str | None = None) -> PromptLogprobs:
        """`slots_ending_with`: a back end may leave `{}` at positions whose token does not end with it."""
        raise LLMError("unsupported", f"{type(self).__name__} cannot return prompt log-probabilities")

    def chat_prompt(self, messages: list[dict]) -> str | None:
        """The prompt text this back end feeds its model for a chat request (the chat template applied, the
        assistant's turn opened), to ask `prompt_logprobs` what the reply's first token would be; None when
        the back end does not render chat prompts itself (a server does)."""
        return None

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


def client_with(client, attr: str):
    """The first client along a wrapper chain (`.inner`: e.g. CachedClient -> LocalClient) that has `attr`, or
    None (e.g. a remote back end has no local engine)."""
    while client is not None and not hasattr(client, attr):
        client = getattr(client, "inner", None)
    return client


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
