"""Batched greedy answers and next-token log-probabilities, under whatever intervention is active.

Prompts are chat-templated token ids (`safesail.chat.encode_chat`). Generation pads on the
left so a batch of prompts of different lengths is answered in one `generate` call; the
answers are cut at the end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass

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


MAX_ROWS = 48   # prompts per pass when scoring continuations from the prompts' cache (one row each)

# called before every batch (the verify stage sets it: `overlap.ThreadGovernor`, torch threads beside the judge)
before_batch = None


def _tick() -> None:
    if before_batch is not None:
        before_batch()


class _FirstLogits:
    """A logits processor that keeps the first step's logits (the next-token distribution after each
    prompt) and changes nothing: `output_logits` would keep every step's [rows, vocab] float32 copy."""

    def __init__(self):
        self.first: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = scores.detach().float().clone()
        return scores


def LogitsProcessorList(items):  # noqa: N802 - transformers' list type, imported when first needed
    from transformers import LogitsProcessorList as _L

    return _L(items)


@dataclass
class Generated:
    ids: list[list[int]]                  # greedy answers, end-of-turn token removed
    first: torch.Tensor                   # [n, vocab] log-probs of the first answer token (the next-token distribution)
    continuations: list[torch.Tensor] | None = None   # per prompt: [m_i] log P(continuation_j | prompt)


@torch.no_grad()
def generate_full(lm, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8, ivs: list | None = None,
                  continuations: list[list[list[int]]] | None = None, sort_by_length: bool = True) -> Generated:
    """Greedy answers of each prompt (`ivs`: each prompt's intervention), the next-token log-probs after
    each prompt, and with `continuations` their log-probabilities given the prompt, read from the
    generation's own KV cache of the prompt (no second pass over the prompts). Prompts are batched in
    order of length (less padding); results come back in the prompts' order."""
    if sort_by_length and len(prompts) > batch_size:
        order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
        g = generate_full(lm, [prompts[k] for k in order], max_new_tokens, batch_size,
                          [ivs[k] for k in order] if ivs else None,
                          [continuations[k] for k in order] if continuations is not None else None, False)
        back = sorted(range(len(order)), key=lambda k: order[k])
        return Generated([g.ids[k] for k in back], g.first[torch.tensor(back)],
                         [g.continuations[k] for k in back] if g.continuations is not None else None)
    pad, stops = _pad_id(lm), eos_ids(lm)
    out: list[list[int]] = []
    firsts, conts_out = [], []
    for i in range(0, len(prompts), batch_size):
        _tick()
        chunk = prompts[i:i + batch_size]
        ids, mask = _padded(chunk, pad, left=True)
        width = ids.shape[1]
        keep = _FirstLogits()
        with _rows(ivs, i, len(chunk))(lm.model):
            gen = lm.model.generate(ids.to(lm.device), attention_mask=mask.to(lm.device),
                                    max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, pad_token_id=pad, return_dict_in_generate=True,
                                    logits_processor=LogitsProcessorList([keep]))
        first = torch.log_softmax(keep.first, -1).cpu()
        firsts.append(first)
        if continuations is not None:
            cache = _cache_of(gen)
            if cache.get_seq_length() > width:
                cache.crop(width - cache.get_seq_length())
            conts_out += _continuations(lm, cache, chunk, mask, first, continuations[i:i + batch_size],
                                        ivs[i:i + batch_size] if ivs else None)
        for row in gen.sequences[:, width:].tolist():
            ans = []
            for t in row:
                if t in stops:
                    break
                ans.append(t)
            out.append(ans)
    return Generated(out, torch.cat(firsts) if firsts else torch.zeros(0),
                     conts_out if continuations is not None else None)


def generate_batch(lm, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                   ivs: list | None = None) -> list[list[int]]:
    """Greedy answers (token ids, end-of-turn token removed) of each prompt; `ivs`: each prompt's intervention."""
    return generate_full(lm, prompts, max_new_tokens, batch_size, ivs).ids


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _trie_nodes(conts: list[list[int]]) -> list[tuple[int, ...]]:
    """The inputs that score a prompt's continuations: every distinct proper prefix (length >= 1) of them,
    parents before children. A continuation c needs the logits after c[:1], ..., c[:-1]; openings that
    start alike ("I can't", "I cannot", "I'm sorry", ...) share those inputs."""
    return sorted({tuple(c[:k]) for c in conts for k in range(1, len(c))}, key=lambda n: (len(n), n))


def _tree_mask(model, prompt_mask: torch.Tensor, nodes: list[list[tuple[int, ...]]], width: int) -> torch.Tensor:
    """[rows, 1, width, W + width] 4-d attention mask: each node attends to its prompt's (unpadded) cached
    positions, to its ancestors and to itself; padding nodes attend to the prompt and themselves."""
    rows, W = prompt_mask.shape
    m = torch.zeros((rows, 1, width, W + width), dtype=torch.bool)
    m[:, 0, :, :W] = prompt_mask.bool()[:, None, :]
    for r, ns in enumerate(nodes):
        where = {n: j for j, n in enumerate(ns)}
        for j, n in enumerate(ns):
            for k in range(1, len(n) + 1):
                m[r, 0, j, W + where[n[:k]]] = True
        for j in range(len(ns), width):
            m[r, 0, j, W + j] = True
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":   # additive float mask
        f = torch.zeros(m.shape, dtype=model.dtype)
        return f.masked_fill(~m, torch.finfo(model.dtype).min)
    return m


def _continuations(lm, cache, chunk, mask, first, conts, ivs) -> list[torch.Tensor]:
    """log P(continuation | prompt) from a KV cache of the left-padded prompts (`mask`).

    Per prompt, every continuation is scored in ONE row: the distinct prefixes of its continuations
    (a trie, `_trie_nodes`) are fed at once under a tree-shaped attention mask (each token sees the
    prompt and its own ancestors, at the position it would have in a plain pass), so openings that
    share their first tokens share that work. Prompts with the same continuations (one language) go
    in one pass, each row reading its own prompt's cache; equal to one pass per continuation (tested)."""
    from transformers import DynamicCache

    dev = lm.device
    out = [torch.tensor([float(first[a, c[0]]) for c in cs]) for a, cs in enumerate(conts)]
    groups: dict[tuple, list[int]] = {}
    for a, cs in enumerate(conts):
        key = tuple(tuple(c) for c in cs)
        if any(len(c) > 1 for c in cs):
            groups.setdefault(key, []).append(a)
    if not groups:
        return out
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    base = getattr(lm.model, lm.model.base_model_prefix)
    head = lm.model.get_output_embeddings()
    for key, rows in groups.items():
        nodes = _trie_nodes([list(c) for c in key])
        where = {n: j for j, n in enumerate(nodes)}
        for r0 in range(0, len(rows), MAX_ROWS):
            part = rows[r0:r0 + MAX_ROWS]
            _tick()
            idx = torch.tensor(part, device=layers[0][0].device)
            sub = DynamicCache(ddp_cache_data=[(k[idx], v[idx]) for k, v in layers])
            ids = torch.tensor([[n[-1] for n in nodes]] * len(part), dtype=torch.long)
            pos = torch.tensor([[len(chunk[a]) + len(n) - 1 for n in nodes] for a in part], dtype=torch.long)
            m4 = _tree_mask(lm.model, mask[part], [nodes] * len(part), len(nodes))
            with per_row([ivs[a] for a in part] if ivs else None).apply(lm.model):
                hidden = base(input_ids=ids.to(dev), attention_mask=m4.to(dev), position_ids=pos.to(dev),
                              cache=sub, use_cache=True).last_hidden_state
            for r, a in enumerate(part):
                logp = torch.log_softmax(head(hidden[r]).float(), -1).cpu()      # [nodes, vocab]
                for j, c in enumerate(key):
                    for k in range(1, len(c)):
                        out[a][j] += logp[where[c[:k]], c[k]]
    return out


@torch.no_grad()
def next_token_logprobs(lm, prompts: list[list[int]], batch_size: int = 8, ivs: list | None = None) -> torch.Tensor:
    """[n, vocab] log-probabilities of the token after each prompt (right padding, one forward per batch)."""
    pad = _pad_id(lm)
    rows = []
    for i in range(0, len(prompts), batch_size):
        _tick()
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
    one left-padded pass over a batch of prompts (logits of its last position only), its KV cache
    repeated for the continuations."""
    from transformers import DynamicCache

    dev, pad = lm.device, _pad_id(lm)
    out: list[torch.Tensor] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids, mask = _padded(chunk, pad, left=True)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with _rows(ivs, i, len(chunk))(lm.model):
            res = lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                           use_cache=True, cache=DynamicCache(), logits_to_keep=1)
        first = torch.log_softmax(res.logits[:, -1].float(), -1).cpu()
        out += _continuations(lm, _cache_of(res), chunk, mask, first, continuations[i:i + batch_size],
                              ivs[i:i + batch_size] if ivs else None)
    return out


@torch.no_grad()
def token_logprobs(lm, seqs: list[list[int]], batch_size: int, ivs: list | None = None, capture=()):
    """Per sequence: [len-1] log P(next token) (teacher-forced, right padding, each row under its own
    intervention), and with `capture` (hook points) {hook name: [len, d]} float activations there.

    The unembedding is applied one row at a time to that row's real positions, so no
    [batch, length, vocab] float32 logits (and their log-softmax copy) exist at once: 1.3 GB for 48
    rows of 70 tokens on SmolLM2's 49k vocabulary, the largest buffer the verify stage allocated."""
    from safesail.hooks import hook_module

    pad, lps, acts = _pad_id(lm), [], []
    base = getattr(lm.model, lm.model.base_model_prefix)
    head = lm.model.get_output_embeddings()
    for a in range(0, len(seqs), batch_size):
        _tick()
        chunk = seqs[a:a + batch_size]
        ids, mask = _padded(chunk, pad)
        got: dict[str, torch.Tensor] = {}

        def keeper(name):
            def hook(_module, _inputs, output):
                got[name] = (output[0] if isinstance(output, tuple) else output).detach()
            return hook

        handles = [hook_module(lm.model, hp).register_forward_hook(keeper(hp.name)) for hp in capture]
        try:
            with per_row(ivs[a:a + len(chunk)] if ivs else None).apply(lm.model):
                hidden = base(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        for j, s in enumerate(chunk):
            n = len(s) - 1
            logp = torch.log_softmax(head(hidden[j, :n]).float(), -1).cpu()
            lps.append(logp[torch.arange(n), torch.tensor(s[1:], dtype=torch.long)])
            acts.append({k: v[j, :len(s)].float() for k, v in got.items()})
    return lps, acts


@torch.no_grad()
def residual_norms(lm, hooks: list, prompts: list[list[int]]) -> dict[str, float]:
    """{hook name: `steering.residual_norm(lm, hook, prompts)`} for several hooks from ONE pass per prompt
    (to the deepest hooked block) instead of one per hook: each prompt runs alone as there, so every norm
    is the same to the bit (tested); the passes to the shallower blocks were 37% of the demo's R passes."""
    from safesail.hooks import HookPoint, capture_activations, special_token_mask

    resid = {hp.name: HookPoint(hp.layer, "resid") for hp in hooks}
    points = sorted(set(resid.values()), key=lambda p: p.layer)
    norms: dict[str, list[torch.Tensor]] = {p.name: [] for p in points}
    for p in prompts:
        ids = torch.tensor([p], device=lm.device)
        acts = capture_activations(lm.model, ids, None, points)
        keep = ~special_token_mask(lm.tokenizer, ids)[0]
        keep[0] = False
        if bool(keep.any()):
            for pt in points:
                norms[pt.name].append(acts[pt.name][0].float()[keep].norm(dim=-1).cpu())
    return {h: float(torch.cat(norms[r.name]).median()) if norms[r.name] else 0.0 for h, r in resid.items()}
