"""OpenAI-compatible HTTP back end (OpenAI, vLLM, `transformers serve`, any base URL).

Built on `openai.AsyncOpenAI` with its own retries switched off: this client
retries transport failures (429s, 5xx replies, timeouts, connection errors, a
200 whose body is not a whole JSON reply, a reply with no text) with
exponential backoff plus jitter, and never retries a 400-class bad request. A
semaphore bounds the requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import openai

from safesail.config_types import LLMConfig, load_group
from safesail.errors import UserError
from safesail.interpret.clients.base import (TRANSPORT_FAILURES, ChatRequest, Completion, LLMClient, LLMError,
                                             PromptLogprobs)
from safesail.interpret.clients.registry import register_backend

log = logging.getLogger(__name__)

RETRYABLE = TRANSPORT_FAILURES


def classify(exc: BaseException) -> LLMError:
    """Map an `openai` exception to an LLMError with a short reason."""
    if isinstance(exc, LLMError):
        return exc
    msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
        return LLMError("timeout", msg)
    if isinstance(exc, openai.APIConnectionError):
        return LLMError("connection", msg)
    if isinstance(exc, openai.RateLimitError):
        return LLMError("rate_limited", msg)
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        if code == 429:
            return LLMError("rate_limited", msg)
        if code >= 500:
            return LLMError("server_error", f"HTTP {code}: {msg}")
        if code in (401, 403):
            return LLMError("auth", f"HTTP {code}: {msg}")
        if "context" in msg.lower() and ("length" in msg.lower() or "window" in msg.lower()):
            return LLMError("context_overflow", f"HTTP {code}: {msg}")
        return LLMError("bad_request", f"HTTP {code}: {msg}")
    if isinstance(exc, (openai.APIResponseValidationError, ValueError, KeyError, TypeError)):
        # A 200 whose body does not parse as the reply (cut off on the way, a proxy's page, ...).
        return LLMError("truncated_reply", msg)
    return LLMError("other", f"{type(exc).__name__}: {msg}")


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: uniformly in [0.5, 1.5) x min(cap, base * 2**attempt)."""
    r = (rng or random).random()
    return min(cap, base * (2 ** attempt)) * (0.5 + r)


@register_backend("openai", "http")
class OpenAIClient(LLMClient):
    def __init__(self, model: str | None, base_url: str, api_key: str | None = None, context_window: int = 8192,
                 concurrency: int = 4, timeout_s: float = 60.0, max_retries: int = 5, backoff_base_s: float = 1.0,
                 backoff_max_s: float = 60.0, logprobs_top_n: int = 20, supports_prompt_logprobs: bool = False,
                 http_client: Any = None, tokenizer: Any = None):
        self._model = model
        self.base_url = base_url
        self.context_window = int(context_window)
        self.supports_prompt_logprobs = bool(supports_prompt_logprobs)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.logprobs_top_n = int(logprobs_top_n)
        self.tokenizer = tokenizer
        self._sem = asyncio.Semaphore(max(1, int(concurrency)))
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=0,
                                          timeout=self.timeout_s, http_client=http_client)
        self.retries = 0  # how many retries this client made (for logs and tests)

    @dataclass
    class Settings(LLMConfig):
        """The keys of an `llm` group with `backend: openai` (defaults: configs/llm/openai.yaml, vllm.yaml, ...)."""
        model: Optional[str]
        base_url: Optional[str]
        api_key_env: Optional[str]
        max_retries: int
        backoff_base_s: float
        backoff_max_s: float
        logprobs_top_n: int
        supports_prompt_logprobs: bool
        tokenizer: Optional[str]

    @classmethod
    def from_cfg(cls, cfg, **kw) -> "OpenAIClient":
        """From an `llm` config group (every key checked by its type; defaults only in the YAML)."""
        return cls.from_settings(load_group(cfg, cls.Settings, "llm"), **kw)

    @classmethod
    def from_settings(cls, s: "OpenAIClient.Settings", cache_dir=None, device=None, **kw) -> "OpenAIClient":
        key = os.environ.get(s.api_key_env) if s.api_key_env else None
        if not s.base_url:
            raise UserError("llm.base_url is empty; set it to the server's OpenAI-compatible URL, "
                            "e.g. llm.base_url=http://localhost:8000/v1.")
        if "api.openai.com" in s.base_url and not key:
            raise UserError(f"the environment variable {s.api_key_env or 'OPENAI_API_KEY'} holding the API key is "
                            "not set; export it or point llm.api_key_env at the variable that holds your key.")
        tokenizer = None
        if s.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(s.tokenizer)
        return cls(model=s.model, base_url=s.base_url, api_key=key, context_window=s.context_window,
                   concurrency=s.concurrency, timeout_s=s.timeout_s, max_retries=s.max_retries,
                   backoff_base_s=s.backoff_base_s, backoff_max_s=s.backoff_max_s, logprobs_top_n=s.logprobs_top_n,
                   supports_prompt_logprobs=s.supports_prompt_logprobs, tokenizer=tokenizer, **kw)

    # ---- identity ------------------------------------------------------------
    @property
    def model_name(self) -> str:  # type: ignore[override]
        return self._model or ""

    async def ensure_ready(self) -> None:
        """With no model configured, use the (first) model the server lists."""
        if self._model:
            return
        try:
            page = await self._with_retries(lambda: self._client.models.list())
        except LLMError as e:
            raise LLMError(e.reason, f"cannot list the models of {self.base_url}: {e.message}") from None
        ids = [m.id for m in page.data]
        if not ids:
            raise LLMError("bad_request", f"{self.base_url} serves no model; set llm.model")
        self._model = ids[0]
        log.info("using model %s served at %s", self._model, self.base_url)

    def cache_identity(self) -> dict[str, Any]:
        return {"backend": "openai", "base_url": self.base_url, "model": self.model_name}

    def chat_prompt(self, messages: list[dict]) -> str | None:
        """With `llm.tokenizer` (the served model's), its chat template rendered here, so a completions
        endpoint's prompt log-probabilities can read the reply's first token; None without one."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        # No tokenizer: a conservative estimate (byte-level BPEs give ~3-4 characters per token in English).
        return max(1, (len(text.encode("utf-8")) + 2) // 3)

    # ---- calls ----------------------------------------------------------------
    async def _with_retries(self, make_call):
        attempt = 0
        while True:
            try:
                async with self._sem:
                    return await asyncio.wait_for(make_call(), timeout=self.timeout_s + 5)
            except Exception as exc:  # noqa: BLE001 - classified below
                err = classify(exc)
                if err.reason not in RETRYABLE or attempt >= self.max_retries:
                    raise err from None
                delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s)
                retry_after = _retry_after(exc)
                if retry_after is not None:
                    delay = min(self.backoff_max_s, max(delay, retry_after))
                log.warning("LLM call failed (%s); retry %d/%d in %.1fs", err.reason, attempt + 1,
                            self.max_retries, delay)
                self.retries += 1
                attempt += 1
                await asyncio.sleep(delay)

    async def chat(self, req: ChatRequest) -> Completion:
        await self.ensure_ready()
        kw: dict[str, Any] = dict(model=self.model_name, messages=req.messages, max_tokens=req.max_tokens,
                                  temperature=req.temperature)
        if req.stop:
            kw["stop"] = req.stop
        if req.json_schema is not None:
            kw["response_format"] = response_format(req.json_schema)

        async def call():
            # Reading the reply is part of the call: a body cut short or empty is retried like a 5xx.
            resp = await self._client.chat.completions.create(**kw)
            try:
                text = resp.choices[0].message.content
            except (AttributeError, IndexError, TypeError):
                raise LLMError("truncated_reply", "the server's reply has no choices[0].message") from None
            if text is None or not str(text).strip():
                raise LLMError("empty_reply", "the server returned an empty message")
            return resp, text

        resp, text = await self._with_retries(call)
        usage = getattr(resp, "usage", None)
        return Completion(text=str(text), model=str(getattr(resp, "model", None) or self.model_name),
                          prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                          completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                          raw=_jsonable(resp))

    async def prompt_logprobs(self, prompt: str, candidates: list[str],
                              slots_ending_with: str | None = None) -> PromptLogprobs:
        """Through the completions endpoint: echo=True, logprobs=N, max_tokens=1 (vLLM supports it).

        Every position comes back (`slots_ending_with` saves nothing through an API)."""
        await self.ensure_ready()
        resp = await self._with_retries(lambda: self._client.completions.create(
            model=self.model_name, prompt=prompt, max_tokens=1, temperature=0.0, echo=True,
            logprobs=self.logprobs_top_n))
        try:
            lp = resp.choices[0].logprobs
        except (AttributeError, IndexError):
            lp = None
        if lp is None or not getattr(lp, "tokens", None) or getattr(lp, "top_logprobs", None) is None:
            raise LLMError("unsupported", f"{self.base_url} returned no prompt log-probabilities "
                                          "(it needs echo=True with logprobs, as vLLM has)")
        tokens = list(lp.tokens)
        tops = list(lp.top_logprobs)
        usage = getattr(resp, "usage", None)
        n_prompt = int(getattr(usage, "prompt_tokens", 0) or 0) or max(0, len(tokens) - 1)
        n_prompt = min(n_prompt, len(tokens))
        wanted = set(candidates)
        nxt: list[dict[str, float]] = []
        for i in range(n_prompt):
            top = tops[i + 1] if i + 1 < len(tops) else None
            nxt.append({t: float(v) for t, v in (top or {}).items() if t in wanted})
        return PromptLogprobs(tokens=tokens[:n_prompt], next_logprobs=nxt, prompt_tokens=n_prompt)

    async def aclose(self) -> None:
        await self._client.close()


def response_format(json_schema: dict) -> dict:
    """OpenAI's structured-output `response_format` for a bare JSON schema or an already wrapped
    `{"name", "strict", "schema"}` object (which is sent unchanged, not wrapped a second time)."""
    if isinstance(json_schema.get("schema"), dict) and "type" not in json_schema:
        wrapped = dict(json_schema)
        wrapped.setdefault("name", "reply")
    else:
        wrapped = {"name": "reply", "strict": True, "schema": json_schema}
    return {"type": "json_schema", "json_schema": wrapped}


def _retry_after(exc: BaseException) -> float | None:
    resp = getattr(exc, "response", None)
    headers = getattr(resp, "headers", None)
    if not headers:
        return None
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


def _jsonable(resp) -> dict | None:
    try:
        return resp.model_dump(mode="json")
    except Exception:  # noqa: BLE001 - raw is informational only
        return None
