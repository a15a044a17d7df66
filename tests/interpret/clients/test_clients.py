"""LLM clients around the HTTP layer: retries with backoff, no retry on bad requests, the SQLite cache.

The HTTP layer is a test double here (httpx.MockTransport); the real server is in test_clients_server.py.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from safesail.interpret.clients.base import ChatRequest, LLMError
from safesail.interpret.clients.cache import CachedClient
from safesail.interpret.clients.openai_http import OpenAIClient, backoff_delay


def _reply(text="a reply", model="m"):
    return {"id": "x", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}


class Script:
    """Answers requests in order from a list of (status, body) or exceptions; records what it got."""

    def __init__(self, steps):
        self.steps = list(steps)
        self.requests: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content or b"{}"))
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        status, body = step
        headers = {"retry-after": "0"} if status == 429 else {}
        return httpx.Response(status, json=body, headers=headers)


def _client(script, **kw):
    http = httpx.AsyncClient(transport=httpx.MockTransport(script))
    opts = dict(model="m", base_url="http://llm.test/v1", backoff_base_s=0.01, backoff_max_s=0.05, max_retries=3,
                timeout_s=5)
    opts.update(kw)
    return OpenAIClient(http_client=http, **opts)


REQ = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5)


def test_retries_429_and_500_then_succeeds():
    script = Script([(429, {"error": {"message": "slow down"}}), (500, {"error": {"message": "boom"}}),
                     (200, _reply("fine"))])
    c = _client(script)
    comp = asyncio.run(c.chat(REQ))
    assert comp.text == "fine" and comp.prompt_tokens == 7
    assert len(script.requests) == 3 and c.retries == 2
    assert script.requests[0]["max_tokens"] == 5 and script.requests[0]["model"] == "m"


def test_bad_request_is_not_retried():
    script = Script([(400, {"error": {"message": "bad field"}})])
    c = _client(script)
    with pytest.raises(LLMError) as e:
        asyncio.run(c.chat(REQ))
    assert e.value.reason == "bad_request" and len(script.requests) == 1


def test_gives_up_after_max_retries_with_the_reason():
    script = Script([(503, {"error": {"message": "overloaded"}})])
    c = _client(script, max_retries=2)
    with pytest.raises(LLMError) as e:
        asyncio.run(c.chat(REQ))
    assert e.value.reason == "server_error" and len(script.requests) == 3
    script = Script([httpx.ReadTimeout("slow")])
    with pytest.raises(LLMError) as e:
        asyncio.run(_client(script, max_retries=1).chat(REQ))
    assert e.value.reason == "timeout" and len(script.requests) == 2


def test_empty_reply_and_unreachable_server():
    with pytest.raises(LLMError) as e:
        asyncio.run(_client(Script([(200, _reply(""))])).chat(REQ))
    assert e.value.reason == "empty_reply"
    # A real closed port: connection refused, retried, then reported.
    c = OpenAIClient(model="m", base_url="http://127.0.0.1:9/v1", max_retries=1, backoff_base_s=0.01, timeout_s=2)
    with pytest.raises(LLMError) as e:
        asyncio.run(c.chat(REQ))
    assert e.value.reason == "connection"


def test_backoff_grows_exponentially_with_jitter():
    import random

    rng = random.Random(0)
    d = [backoff_delay(a, 1.0, 100.0, rng) for a in range(6)]
    for a, x in enumerate(d):
        assert 0.5 * 2 ** a <= x < 1.5 * 2 ** a
    assert backoff_delay(20, 1.0, 8.0, rng) < 12.0  # capped


def test_cache_answers_repeats_without_calling(tmp_path):
    script = Script([(200, _reply("one"))])

    async def go():
        c = CachedClient(_client(script), tmp_path / "cache.sqlite")
        a = await c.chat(REQ)
        b = await c.chat(REQ)
        # Identical requests in flight together share one call.
        other = ChatRequest(messages=[{"role": "user", "content": "other"}], max_tokens=5)
        x, y = await asyncio.gather(c.chat(other), c.chat(other))
        hot = ChatRequest(messages=REQ.messages, max_tokens=5, temperature=0.7)  # another parameter: a miss
        await c.chat(hot)
        stats = c.stats
        await c.aclose()
        return a, b, x, y, stats

    a, b, x, y, stats = asyncio.run(go())
    assert a.text == b.text == "one" and not a.cached and b.cached
    assert len(script.requests) == 3  # REQ, other, hot
    assert (stats.calls, stats.hits, stats.misses) == (5, 2, 3)

    async def again():  # a new process: the file answers
        c = CachedClient(_client(script), tmp_path / "cache.sqlite")
        r = await c.chat(REQ)
        await c.aclose()
        return r, c.stats

    r, stats2 = asyncio.run(again())
    assert r.cached and r.text == "one" and len(script.requests) == 3 and stats2.hit_rate == 1.0


def test_errors_are_not_cached(tmp_path):
    script = Script([(400, {"error": {"message": "no"}}), (200, _reply("later"))])

    async def go():
        c = CachedClient(_client(script), tmp_path / "c.sqlite")
        with pytest.raises(LLMError):
            await c.chat(REQ)
        r = await c.chat(REQ)
        await c.aclose()
        return r

    assert asyncio.run(go()).text == "later" and len(script.requests) == 2


def test_prompt_logprobs_parse_the_completions_echo_format():
    body = {"id": "x", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "length", "text": "The cat sat",
                         "logprobs": {"tokens": ["The", " cat", " sat"], "token_logprobs": [None, -2.0, -1.0],
                                      "top_logprobs": [None, {" cat": -2.0, " dog": -1.5},
                                                       {" sat": -1.0, " ran": -2.5}],
                                      "text_offset": [0, 3, 7]}}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
    script = Script([(200, body)])
    out = asyncio.run(_client(script).prompt_logprobs("The cat", [" dog", " ran", " zebra"]))
    assert out.tokens == ["The", " cat"] and out.prompt_tokens == 2
    assert out.next_logprobs == [{" dog": -1.5}, {" ran": -2.5}]  # missing candidates are absent
    req = script.requests[0]
    assert req["echo"] is True and req["max_tokens"] == 1 and req["logprobs"] == 20
    none = dict(body, choices=[dict(body["choices"][0], logprobs=None)])
    with pytest.raises(LLMError) as e:
        asyncio.run(_client(Script([(200, none)])).prompt_logprobs("The cat", [" dog"]))
    assert e.value.reason == "unsupported"


def test_model_is_asked_from_the_server_when_not_configured():
    models = {"object": "list", "data": [{"id": "served-model", "object": "model", "created": 0, "owned_by": "x"}]}
    script = Script([(200, models), (200, _reply("ok", "served-model"))])
    c = _client(script, model=None)
    comp = asyncio.run(c.chat(REQ))
    assert c.model_name == "served-model" and script.requests[-1]["model"] == "served-model" and comp.text == "ok"
