"""The HTTP client against a real local server that injects transport faults and enforces JSON schemas
(issue 16, items 5 and 7). The server is tests/llm_fault_server.py: real sockets, openai -> httpx -> TCP."""

from __future__ import annotations

import asyncio
import json

import pytest

from llm_fault_server import FAULTS, FaultServer
from safesail.interpret.clients.base import ChatRequest, LLMError, is_transport_failure
from safesail.interpret.clients.cache import CachedClient
from safesail.interpret.clients.openai_http import OpenAIClient

REQ = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=8)
# What the scorers pass as ChatRequest.json_schema: OpenAI's {name, strict, schema} object.
ANSWERS_SCHEMA = {"name": "answers", "strict": True,
                  "schema": {"type": "object", "additionalProperties": False, "required": ["answers"],
                             "properties": {"answers": {"type": "array", "minItems": 3, "maxItems": 3,
                                                        "items": {"type": "boolean"}}}}}


def _client(server: FaultServer, **kw) -> OpenAIClient:
    opts = dict(model=None, base_url=server.base_url, max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05,
                timeout_s=5)
    opts.update(kw)
    return OpenAIClient(**opts)


def _chat(client, req=REQ):
    async def go():
        try:
            return await client.chat(req)
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("fault", FAULTS)
def test_each_transport_fault_is_retried_with_backoff(fault):
    with FaultServer(reply=lambda body: "a healthy reply", plan=[fault, fault]) as server:
        client = _client(server)
        comp = _chat(client)
    assert comp.text == "a healthy reply" and comp.model == "fault-test-model"
    assert server.sent == [fault, fault, "ok"] and client.retries == 2


@pytest.mark.parametrize("fault, reason", [("truncated", "truncated_reply"), ("html", "truncated_reply"),
                                           ("empty", "empty_reply"), ("cut", "connection")])
def test_a_fault_that_outlasts_the_retries_is_named_as_transport(fault, reason):
    with FaultServer(reply=lambda body: "never seen", plan=[fault] * 10) as server:
        client = _client(server, max_retries=2)
        with pytest.raises(LLMError) as e:
            _chat(client)
    assert e.value.reason == reason and e.value.transport and is_transport_failure(reason)
    assert len(server.sent) == 3  # the first try and two retries


def test_structured_output_reaches_a_schema_enforcing_server_wrapped_once():
    answer = json.dumps({"answers": [True, False, True]})
    wrapped = ANSWERS_SCHEMA
    bare = wrapped["schema"]
    with FaultServer(reply=lambda body: answer) as server:
        a = _chat(_client(server), ChatRequest(REQ.messages, max_tokens=20, json_schema=wrapped))
        b = _chat(_client(server), ChatRequest(REQ.messages, max_tokens=20, json_schema=bare))
    assert a.text == b.text == answer
    assert server.sent == ["ok", "ok"]
    first, second = (r["response_format"]["json_schema"] for r in server.requests)
    assert first == wrapped  # sent as given: name, strict and the schema with its type and properties
    assert second["schema"] == bare and second["schema"]["type"] == "object" and second["strict"] is True


def test_a_schema_the_server_refuses_is_a_bad_request_not_retried():
    with FaultServer(reply=lambda body: "{}") as server:
        client = _client(server)
        with pytest.raises(LLMError) as e:
            _chat(client, ChatRequest(REQ.messages, json_schema={"name": "x", "schema": {"items": {}}}))
    assert e.value.reason == "bad_request" and not e.value.transport and server.sent == ["schema_refused"]


def test_faults_are_not_cached_and_a_later_attempt_is_asked_afresh(tmp_path):
    with FaultServer(reply=lambda body: f"reply {len(server.requests)}", plan=["truncated"] * 3) as server:
        async def go():
            c = CachedClient(_client(server, max_retries=1), tmp_path / "cache.sqlite")
            try:
                with pytest.raises(LLMError):
                    await c.chat(REQ)          # truncated twice: the call fails, nothing is stored
                first = await c.chat(REQ)      # truncated once, then healthy: stored
                again = await c.chat(REQ)      # from the cache
                retry = await c.chat(ChatRequest(REQ.messages, REQ.max_tokens, attempt=1))  # a new call
                return first, again, retry
            finally:
                await c.aclose()

        first, again, retry = asyncio.run(go())
    assert server.sent == ["truncated", "truncated", "truncated", "ok", "ok"]
    assert not first.cached and again.cached and again.text == first.text
    assert not retry.cached and retry.text != first.text
