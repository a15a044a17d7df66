"""Run the concept-contrastive pairs through the source model and keep the hook activations.

Query 2*i is pair i's concept query, query 2*i+1 its neutral twin. Each query is
formatted as a chat turn (system prompt + user query + generation prompt). Kept
tokens: not special (chat-template markers), and after the token prefix that every
query shares (the system prompt and the start of the user turn: in a causal model
their activations are identical in every query, so they cannot tell a pair apart).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from safesail.chat import encode_chat
from safesail.hooks import HookPoint, capture_activations, special_token_mask
from safesail.train.pairs import Pair

log = logging.getLogger(__name__)


@dataclass
class PairActivations:
    acts: dict[str, torch.Tensor]   # hook -> [T, d] float32 on CPU (kept tokens of all queries)
    query_index: torch.Tensor       # [T] int64: the query each kept token belongs to
    token_ids: torch.Tensor         # [T] int64: the kept tokens' ids
    n_queries: int                  # 2 * number of pairs
    n_tokens: int

    def concept_rows(self) -> slice:
        return slice(0, self.n_queries, 2)

    def neutral_rows(self) -> slice:
        return slice(1, self.n_queries, 2)


def pair_queries(pairs: list[Pair]) -> list[str]:
    out: list[str] = []
    for p in pairs:
        out += [p.concept_query, p.neutral_query]
    return out


def common_prefix_len(seqs: list[list[int]]) -> int:
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs):
            return i
    return n


def capture_pair_activations(lm, pairs: list[Pair], points: list[HookPoint], system_prompt: str | None,
                             batch_size: int = 16, max_length: int | None = None) -> PairActivations:
    """Forward every query of the pairs once, capturing all hook points in the same pass."""
    tok = lm.tokenizer
    queries = pair_queries(pairs)
    ids = [encode_chat(tok, q, system_prompt) for q in queries]
    if max_length:
        ids = [s[:int(max_length)] for s in ids]
    prefix = common_prefix_len(ids)
    # Leave at least the last token of every query even in odd cases (a query that is a prefix of another).
    prefix = min(prefix, min(len(s) for s in ids) - 1)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    per_hook: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in points}
    qidx: list[torch.Tensor] = []
    tids: list[torch.Tensor] = []
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="pairs through the model", unit="batch", leave=False):
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            mask[row, :len(ids[i])] = 1
        keep = mask.bool() & ~special_token_mask(tok, input_ids)
        keep[:, :prefix] = False
        acts = capture_activations(lm.model, input_ids.to(lm.device), mask.to(lm.device), points)
        for name, a in acts.items():
            per_hook[name].append(a.float().cpu()[keep])
        rows = torch.tensor(batch, dtype=torch.long).unsqueeze(1).expand(-1, width)
        qidx.append(rows[keep])
        tids.append(input_ids[keep])
    query_index = torch.cat(qidx)
    present = torch.bincount(query_index, minlength=len(queries))
    if bool((present == 0).any()):
        bad = int(torch.nonzero(present == 0)[0])
        log.warning("query %r keeps no token after masking; it counts as firing nothing", queries[bad][:60])
    out = {name: torch.cat(chunks) for name, chunks in per_hook.items()}
    log.info("pairs: %d queries, %d kept tokens (shared prefix of %d tokens left out)",
             len(queries), int(query_index.numel()), prefix)
    return PairActivations(acts=out, query_index=query_index, token_ids=torch.cat(tids), n_queries=len(queries),
                           n_tokens=int(query_index.numel()))


@torch.no_grad()
def sae_query_max(sae, acts: torch.Tensor, query_index: torch.Tensor, n_queries: int,
                  chunk_tokens: int = 4096, device: torch.device | str = "cpu",
                  masks: tuple[torch.Tensor, ...] = ()) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """[n_queries, n_latents]: each latent's largest code over each query's kept tokens.

    With `masks` ([T] bool each), also the same maximum over each mask's tokens only, from the same
    encoding pass: a tuple (all tokens, mask 1, mask 2, ...)."""
    from safesail.train.contrastive import query_max

    params = list(sae.parameters()) if hasattr(sae, "parameters") else []
    dtype = params[0].dtype if params else torch.float32
    out: list[torch.Tensor] | None = None
    for s in range(0, acts.shape[0], chunk_tokens):
        x = acts[s:s + chunk_tokens].to(device=device, dtype=dtype)
        codes = sae.encode(x).float()
        qi = query_index[s:s + chunk_tokens]
        got = [query_max(codes, qi, n_queries)]
        for m in masks:
            got.append(query_max(codes * m[s:s + chunk_tokens].to(codes.device).unsqueeze(1), qi, n_queries))
        out = got if out is None else [torch.maximum(a, b) for a, b in zip(out, got)]
    assert out is not None, "no tokens to encode"
    out = [o.cpu() for o in out]
    return tuple(out) if masks else out[0]
