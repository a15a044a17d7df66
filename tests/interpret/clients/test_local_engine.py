"""The local back end's prefix cache and batching give the uncached results (tiny random models, seconds)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from safesail.config import compose
from safesail.interpret.clients.base import ChatRequest
from safesail.interpret.clients.local import LocalClient, pick_threads
from safesail.interpret.clients.local_engine import LocalEngine, group_prompts
from safesail.interpret.clients.prefix_cache import PrefixCache, PrefixEntry
from safesail.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

INTRO = ("We study latents inside a language model. Given an explanation, predict how strongly the latent "
         "fires on each token.\nLatent A\nExplanation: words about food\n<start>\nI\t0\n like\t0\n pizza\t10\n<end>\n")


def _prompt(explanation: str, tokens: list[str]) -> str:
    body = "".join(f"{t}\tunknown\n" for t in tokens)
    return f"{INTRO}\nLatent B\nExplanation: {explanation}\n<start>\n{body}<end>\n"


PROMPTS = [
    _prompt("mentions of weapons", ["he", " pulled", " the", " gun"]),
    _prompt("mentions of weapons", ["a", " loaded", " rifle", " on", " the", " table"]),
    _prompt("mentions of weapons", ["the"]),
    _prompt("numbers and dates", ["in", " 1999", " and", " 2004"]),
    _prompt("numbers and dates", ["on", " March", " 3"]),
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, cache_dir):
    cfg = compose(["model=tiny", f"model.architecture={request.param}"])
    return load_model(cfg.model, "cpu", cache_dir=cache_dir)


def _reference_logprobs(lm, text: str, cand: list[int]) -> torch.Tensor:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)[:, cand]


def _candidates(lm) -> tuple[list[str], list[int]]:
    names, ids = [], []
    for c in [str(v) for v in range(10)]:
        toks = lm.tokenizer(c, add_special_tokens=False)["input_ids"]
        if len(toks) == 1:
            names.append(c)
            ids.append(toks[0])
    assert names
    return names, ids


def test_prefix_cached_and_batched_logprobs_equal_uncached(tiny):
    names, cand = _candidates(tiny)
    client = LocalClient(tiny.model, tiny.tokenizer, "tiny", context_window=4096, batch_size=8, batch_wait_ms=50)

    async def go():
        together = await asyncio.gather(*(client.prompt_logprobs(p, names) for p in PROMPTS))  # one batch
        again = [await client.prompt_logprobs(p, names) for p in reversed(PROMPTS)]  # one at a time, cache hits
        await client.aclose()
        return together, again[::-1]

    together, again = asyncio.run(go())
    assert max(client.batches) > 1
    stats = client.engine.stats
    assert stats.computed_tokens < 0.6 * stats.prompt_tokens  # shared prefixes were computed once
    for p, a, b in zip(PROMPTS, together, again):
        ref = _reference_logprobs(tiny, p, cand)
        for res in (a, b):
            got = torch.tensor([[row[c] for c in names] for row in res.next_logprobs])
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
        assert a.tokens == b.tokens and len(a.tokens) == a.prompt_tokens


def test_only_the_asked_slots_are_computed_and_equal_uncached(tiny):
    names, cand = _candidates(tiny)
    client = LocalClient(tiny.model, tiny.tokenizer, "tiny", context_window=4096, batch_size=8, batch_wait_ms=50)

    async def go():
        together = await asyncio.gather(*(client.prompt_logprobs(p, names, slots_ending_with="\t") for p in PROMPTS))
        alone = await client.prompt_logprobs(PROMPTS[0], names, slots_ending_with="\t")
        full = await client.prompt_logprobs(PROMPTS[0], names)  # the same prompt, every position, from the cache
        await client.aclose()
        return together, alone, full

    together, alone, full = asyncio.run(go())
    for p, res in zip(PROMPTS, together):
        ref = _reference_logprobs(tiny, p, cand)
        slots = [i for i, t in enumerate(res.tokens) if t.endswith("\t")]
        assert slots and all(res.next_logprobs[i] == {} for i in range(len(res.tokens)) if i not in slots)
        got = torch.tensor([[res.next_logprobs[i][c] for c in names] for i in slots])
        assert torch.allclose(got, ref[slots], atol=1e-4)
    assert [sorted(d) for d in alone.next_logprobs] == [sorted(d) for d in together[0].next_logprobs]
    assert all(abs(a[c] - b[c]) < 1e-4 for a, b in zip(alone.next_logprobs, together[0].next_logprobs) for c in a)
    ref = _reference_logprobs(tiny, PROMPTS[0], cand)
    got = torch.tensor([[row[c] for c in names] for row in full.next_logprobs])
    assert torch.allclose(got, ref, atol=1e-4)


def test_prefix_cached_batched_generation_equals_generate(tiny):
    client = LocalClient(tiny.model, tiny.tokenizer, "tiny", context_window=4096, batch_size=4, batch_wait_ms=50)
    system = {"role": "system", "content": "You explain latents in a few words. " * 4}
    reqs = [ChatRequest([system, {"role": "user", "content": q}], max_tokens=8)
            for q in ["Name three colors.", "What is 2+2?", "Say hello in French, please."]]

    async def go():
        batched = await asyncio.gather(*(client.chat(r) for r in reqs))
        alone = [await client.chat(r) for r in reqs]
        await client.aclose()
        return batched, alone

    batched, alone = asyncio.run(go())
    assert 3 in client.batches
    for r, b, a in zip(reqs, batched, alone):
        ids = client.encode_messages(r.messages)
        with torch.no_grad():
            out = tiny.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                      pad_token_id=tiny.tokenizer.pad_token_id)
        want = out[0, len(ids):].tolist()
        stop = [i for i, t in enumerate(want) if t in client._stop_ids]
        want = want[:stop[0]] if stop else want
        assert b.text == a.text == tiny.tokenizer.decode(want, skip_special_tokens=True)
        assert b.completion_tokens == len(want)


def test_deterministic_results_have_the_same_bits_whatever_else_ran(tiny):
    """llm.deterministic: a prompt's log-probabilities and reply are bitwise the same asked alone on a fresh engine,
    in a batch with others, and after its prefixes were cached by earlier requests."""
    names, cand = _candidates(tiny)
    req = ChatRequest([{"role": "user", "content": PROMPTS[1]}], max_tokens=6)

    def client():
        return LocalClient(tiny.model, tiny.tokenizer, "tiny", context_window=4096, batch_size=8, batch_wait_ms=50,
                           engine=LocalEngine(tiny.model, tiny.tokenizer), deterministic=True)

    async def alone():
        c = client()
        out = await c.prompt_logprobs(PROMPTS[1], names), await c.chat(req)
        await c.aclose()
        return out

    async def crowded():
        c = client()
        await c.prompt_logprobs(PROMPTS[0], names)  # its prefix (the shared intro) a batching engine would reuse
        many = await asyncio.gather(*(c.prompt_logprobs(p, names) for p in PROMPTS),
                                    *(c.chat(ChatRequest([{"role": "user", "content": p}], max_tokens=6))
                                      for p in PROMPTS))
        await c.aclose()
        return (many[1], many[len(PROMPTS) + 1]), c

    lp_a, chat_a = asyncio.run(alone())
    (lp_b, chat_b), c_crowd = asyncio.run(crowded())
    assert max(c_crowd.batches) > 1                      # the requests did arrive together
    assert len(c_crowd.engine.cache) == 0 and c_crowd.engine.stats.computed_tokens == c_crowd.engine.stats.prompt_tokens
    assert lp_a.next_logprobs == lp_b.next_logprobs     # exact equality of every float, not a tolerance
    assert chat_a.text == chat_b.text and chat_a.completion_tokens == chat_b.completion_tokens
    ref = _reference_logprobs(tiny, PROMPTS[1], cand)
    got = torch.tensor([[row[c] for c in names] for row in lp_a.next_logprobs])
    assert torch.allclose(got, ref, atol=1e-4)


def test_prefix_cache_is_bounded_and_keeps_the_longest_match():
    def entry(ids, n_bytes_per_tok=100):
        t = torch.tensor(ids)
        k = torch.zeros((1, 1, len(ids), n_bytes_per_tok // 8), dtype=torch.float32)
        return PrefixEntry(ids=t, kv=[(k, k.clone())], hidden=torch.zeros((len(ids), 2)),
                           lse=torch.full((len(ids),), float("nan")))

    cache = PrefixCache(max_bytes=3 * entry([1, 2, 3, 4]).nbytes)
    cache.store(entry([1, 2, 3, 4]))
    cache.store(entry([1, 2, 9, 9]))
    e, n = cache.lookup(torch.tensor([1, 2, 3, 7, 7]))
    assert n == 3 and e.ids.tolist() == [1, 2, 3, 4]
    cache.store(entry([1, 2]))  # a prefix of a stored entry is kept only while it adds something
    for i in range(10):
        cache.store(entry([5, 6, 7, i]))
    assert cache.bytes <= cache.max_bytes and len(cache) <= 3
    e, n = cache.lookup(torch.tensor([5, 6, 7, 9]))
    assert n == 4  # the most recent ones survive
    assert cache.lookup(torch.tensor([8]))[0] is None


def test_grouping_puts_one_latents_segments_together():
    shared_a = list(range(100))
    shared_b = list(range(60)) + list(range(500, 540))
    ps = [torch.tensor(shared_a + [1000 + i] * 20) for i in range(3)] + \
         [torch.tensor(shared_b + [2000 + i] * 20) for i in range(2)]
    groups = sorted(sorted(g) for g in group_prompts(ps))
    assert groups == [[0, 1, 2], [3, 4]]


def test_thread_setting():
    cores = __import__("os").cpu_count() or 1
    assert pick_threads("keep") is None
    assert pick_threads(3) == 3
    assert 1 <= pick_threads(None) <= cores and 1 <= pick_threads("auto") <= cores
    from safesail.errors import UserError

    with pytest.raises(UserError, match="llm.threads"):
        pick_threads("many")


def test_chat_prompt_is_the_text_chat_feeds_the_model(tiny, tmp_path):
    """`chat_prompt` renders what `chat` encodes (so a prompt_logprobs caller asks about the reply's first
    token); the cache wrapper passes it through; a back end that does not render prompts says None."""
    from safesail.interpret.clients.cache import CachedClient
    from safesail.interpret.clients.openai_http import OpenAIClient

    client = LocalClient(tiny.model, tiny.tokenizer, "tiny", context_window=4096)
    msgs = [{"role": "system", "content": "Reply yes or no."}, {"role": "user", "content": "Is bread food?"}]
    text = client.chat_prompt(msgs)
    assert client.tokenizer(text, add_special_tokens=False)["input_ids"] == client.encode_messages(msgs)
    assert text.startswith(tiny.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)[:20])
    assert text != tiny.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    cached = CachedClient(client, tmp_path / "c.sqlite")
    assert cached.chat_prompt(msgs) == text
    assert OpenAIClient(model="m", base_url="http://127.0.0.1:9/v1").chat_prompt(msgs) is None


def test_an_api_client_renders_chat_prompts_only_with_a_tokenizer(tiny):
    from safesail.interpret.clients.openai_http import OpenAIClient

    msgs = [{"role": "user", "content": "Is bread food?"}]
    with_tok = OpenAIClient(model="m", base_url="http://127.0.0.1:9/v1", tokenizer=tiny.tokenizer)
    assert with_tok.chat_prompt(msgs) == tiny.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                                            add_generation_prompt=True)
