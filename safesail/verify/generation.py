"""Batched greedy answers and next-token log-probabilities, under whatever intervention is active.

Prompts are chat-templated token ids (`safesail.chat.encode_chat`). Generation pads on the
left so a batch of prompts of different lengths is answered in one `generate` call; the
answers are cut at the end-of-turn token.
"""

from __future__ import annotations

import torch

from safesail.verify.interventions import per_row


def eos_ids(lm) -> set[int]:
    eos = lm.model.generation_config.eos_token_id
    out = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {lm.tokenizer.eos_token_id}
    return {int(x) for x in out if x is not None}


def _pad_id(lm) -> int:
    tok = lm.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def _padded(seqs: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, width] token ids padded with `pad` (on the left when `left`, else the right) and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[j, cols] = torch.tensor(s)
        mask[j, cols] = 1
    return ids, mask


def _rows(ivs, i: int, n: int):
    """The per-row interventions of rows i..i+n (`ivs`: one Intervention or None per prompt)."""
    return per_row(None if ivs is None else ivs[i:i + n]).apply


@torch.no_grad()
def generate_batch(lm, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                   ivs: list | None = None) -> list[list[int]]:
    """Greedy answers (token ids, end-of-turn token removed) of each prompt; `ivs`: each prompt's intervention."""
    pad, stops = _pad_id(lm), eos_ids(lm)
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids, mask = _padded(chunk, pad, left=True)
        width = ids.shape[1]
        with _rows(ivs, i, len(chunk))(lm.model):
            gen = lm.model.generate(ids.to(lm.device), attention_mask=mask.to(lm.device),
                                    max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            ans = []
            for t in row:
                if t in stops:
                    break
                ans.append(t)
            out.append(ans)
    return out


@torch.no_grad()
def next_token_logprobs(lm, prompts: list[list[int]], batch_size: int = 8, ivs: list | None = None) -> torch.Tensor:
    """[n, vocab] log-probabilities of the token after each prompt (right padding, one forward per batch)."""
    pad = _pad_id(lm)
    rows = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids, mask = _padded(chunk, pad)
        with _rows(ivs, i, len(chunk))(lm.model):
            logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float()
        last = torch.tensor([len(p) - 1 for p in chunk], device=logits.device)
        rows.append(torch.log_softmax(logits[torch.arange(len(chunk)), last], -1).cpu())
    return torch.cat(rows)


@torch.no_grad()
def continuation_logprobs(lm, prompts: list[list[int]], continuations: list[list[int]],
                          batch_size: int = 16) -> torch.Tensor:
    """[n] log P(continuation_i | prompt_i), summed over the continuation's tokens."""
    pad = _pad_id(lm)
    seqs = [p + c for p, c in zip(prompts, continuations)]
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        ids, mask = _padded(chunk, pad)
        logp = torch.log_softmax(lm.model(input_ids=ids.to(lm.device),
                                          attention_mask=mask.to(lm.device)).logits.float(), -1).cpu()
        for j in range(len(chunk)):
            p, c = prompts[i + j], continuations[i + j]
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            out.append(float(logp[j, pos, torch.tensor(c)].sum()))
    return torch.tensor(out)


@torch.no_grad()
def shared_prefix_logprobs(lm, prompt: list[int], continuations: list[list[int]]) -> torch.Tensor:
    """[n] log P(continuation_j | prompt): one pass over the prompt, its KV cache shared by all continuations."""
    from transformers import DynamicCache

    dev = lm.device
    if not continuations:
        return torch.zeros(0)
    out = lm.model(input_ids=torch.tensor([prompt], device=dev), use_cache=True, cache=DynamicCache())
    first = torch.log_softmax(out.logits[0, -1].float(), -1).cpu()
    n, width = len(continuations), max(len(c) for c in continuations)
    total = torch.tensor([float(first[c[0]]) for c in continuations])
    if width == 1:
        return total
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_repeat_interleave(n)
    ids = torch.full((n, width - 1), _pad_id(lm), dtype=torch.long)
    mask = torch.zeros((n, len(prompt) + width - 1), dtype=torch.long)
    mask[:, :len(prompt)] = 1
    for j, c in enumerate(continuations):
        ids[j, :len(c) - 1] = torch.tensor(c[:-1])
        mask[j, len(prompt):len(prompt) + len(c) - 1] = 1
    pos = torch.arange(len(prompt), len(prompt) + width - 1).unsqueeze(0).expand(n, -1)
    logits = lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                      cache=cache, use_cache=True).logits.float()
    logp = torch.log_softmax(logits, -1).cpu()
    for j, c in enumerate(continuations):
        for k in range(1, len(c)):
            total[j] += logp[j, k - 1, c[k]]
    return total


@torch.no_grad()
def batched_prefix_logprobs(lm, prompts: list[list[int]], continuations: list[list[list[int]]],
                            batch_size: int = 8, ivs: list | None = None) -> list[torch.Tensor]:
    """Per prompt i, [m_i] log P(continuations[i][j] | prompts[i]), as `shared_prefix_logprobs` but batched:
    one left-padded pass over a batch of prompts, its KV cache repeated for the continuations."""
    from transformers import DynamicCache

    dev, pad = lm.device, _pad_id(lm)
    out: list[torch.Tensor] = []
    for i in range(0, len(prompts), batch_size):
        chunk, conts = prompts[i:i + batch_size], continuations[i:i + batch_size]
        n, m = len(chunk), max(max((len(cs) for cs in conts), default=0), 1)
        width = max((len(c) for cs in conts for c in cs), default=1)
        ids, mask = _padded(chunk, pad, left=True)
        W = ids.shape[1]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with _rows(ivs, i, n)(lm.model):
            res = lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                           use_cache=True, cache=DynamicCache())
            first = torch.log_softmax(res.logits[:, -1].float(), -1).cpu()
            if width > 1:
                cache = res.cache if getattr(res, "cache", None) is not None else res.past_key_values
                cache.batch_repeat_interleave(m)
                nxt = torch.full((n * m, width - 1), pad, dtype=torch.long)
                mask2 = torch.zeros((n * m, W + width - 1), dtype=torch.long)
                pos2 = torch.zeros((n * m, width - 1), dtype=torch.long)
                for a, cs in enumerate(conts):
                    for j in range(m):
                        r = a * m + j
                        mask2[r, :W] = mask[a]
                        pos2[r] = len(chunk[a]) + torch.arange(width - 1)
                        if j < len(cs):
                            c = cs[j]
                            nxt[r, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                            mask2[r, W:W + len(c) - 1] = 1
                logp = torch.log_softmax(lm.model(input_ids=nxt.to(dev), attention_mask=mask2.to(dev),
                                                  position_ids=pos2.to(dev), cache=cache,
                                                  use_cache=True).logits.float(), -1).cpu()
        for a, cs in enumerate(conts):
            tot = torch.tensor([float(first[a, c[0]]) for c in cs])
            for j, c in enumerate(cs):
                for k in range(1, len(c)):
                    tot[j] += logp[a * m + j, k - 1, c[k]]
            out.append(tot)
    return out
