"""The judge's int8 engine: linear layers swapped (not the unembedding), replies close to the float model's,
its own cache identity, no prefix computed before reused after."""

from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace

import torch

from safesail.interpret.clients.cache import CachedClient
from safesail.interpret.clients.local import LocalClient
from safesail.verify.judge_engine import Int8Linear, quantize_judge


def _logprobs(client, prompt, cands):
    async def go():
        res = await client.prompt_logprobs(prompt, cands)
        await client.aclose()
        return res
    return asyncio.run(go())


def test_int8_judge_keeps_its_replies_close_and_marks_its_cache_identity(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model.model)          # the session's tiny model stays as it is
    tok = tiny_model.tokenizer
    local = LocalClient(model, tok, "tiny")
    client = CachedClient(local, tmp_path / "cache.sqlite")
    words = [w for w in ("a", "b", "c", "d") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    prompt = "the quick brown fox jumps over the lazy dog " * 3
    before = _logprobs(client, prompt, words)
    assert len(local.engine.cache) > 0 and "quantize" not in client.cache_identity()

    n = quantize_judge(client, "int8")
    assert n >= 7 * model.config.num_hidden_layers
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)        # the unembedding stays
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == n
    assert len(local.engine.cache) == 0                                        # no bf16 prefix reused
    assert client.cache_identity()["quantize"] == "int8"                       # replies cached apart
    after = _logprobs(local, prompt, words)
    diffs = [abs(a[w] - b[w]) for a, b in zip(before.next_logprobs, after.next_logprobs) for w in a]
    assert diffs and sum(diffs) / len(diffs) < 0.05 and max(diffs) < 0.3      # per-tensor int8 on random weights
    assert quantize_judge(client, "int8") == 0                                 # once only
    assert quantize_judge(client, None) == 0 and quantize_judge(client, "none") == 0


def test_a_back_end_without_a_local_engine_is_left_alone():
    assert quantize_judge(SimpleNamespace(inner=None), "int8") == 0
