"""The local back end's inference engine: prefix-cached, batched prompt scoring and generation.

One `LocalEngine` per loaded model and process (`shared_engine`), used by every
`LocalClient` of explain, score and tag. Prompts that share leading token ids share
work: the longest prefix already in the `PrefixCache` is taken from there, a batch's
common prefix is computed once (and cached), and the rest of each prompt (its
continuation) is computed for all of them in one right-padded batch on top of the
prefix's keys/values. Results equal the uncached forward pass (tested to 1e-4).

* `logprobs(prompts, candidate_ids)`: per prompt, the log-probability of each
  candidate id being the next token after every position (exact, full softmax).
* `generate(prompts, ...)`: greedy or sampled continuations, batched, with stop
  strings and end-of-sequence ids; pads between a prompt and its reply are masked
  and positions are given explicitly, so each row computes as if alone.

Batched and prefix-cached results equal the uncached ones only to rounding (a padded
batch and a split prompt take other kernels), so which requests happened to arrive
together moves the last bits, and a near-tie of two scores can fall either way.
`fresh=True` (the client's `llm.deterministic`) computes each prompt alone, from its
first token, and stores nothing: the same prompt gives the same bits whatever ran before.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safesail.interpret.clients.prefix_cache import PrefixCache, PrefixEntry, common_prefix


@dataclass
class EngineStats:
    prompt_tokens: int = 0     # prompt tokens asked for
    computed_tokens: int = 0   # prompt tokens run through the model (the rest came from the prefix cache)
    forward_calls: int = 0
    generated_tokens: int = 0

    @property
    def reuse(self) -> float:
        return 1 - self.computed_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def group_prompts(prompts: list[torch.Tensor]) -> list[list[int]]:
    """Indices of prompts grouped so that computing each group's common prefix once costs least.

    Sorted by ids, a prompt joins the current group when the tokens computed for the group
    (common prefix once + the longest continuation per member) do not exceed those of
    keeping it apart."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].tolist())
    groups: list[list[int]] = []
    common = 0
    for i in order:
        n = prompts[i].numel()
        if groups:
            g = groups[-1]
            c = min(common, common_prefix(prompts[g[-1]], prompts[i]), n - 1)
            width = max(prompts[j].numel() - c for j in g + [i])
            merged = c + (len(g) + 1) * width
            alone_width = max(prompts[j].numel() - common for j in g)
            apart = common + len(g) * alone_width + n
            if merged < apart:
                g.append(i)
                common = c
                continue
        groups.append([i])
        common = n - 1
    return groups


LSE_ROWS = 32   # rows per shared normaliser call (`LocalEngine._fill_lse`)


class LocalEngine:
    def __init__(self, model, tokenizer, prefix_cache_bytes: int = 512 << 20):
        self.pool_normalisers = True   # False: one normaliser call per request, as before (benchmarks compare)
        self._pool_exact: bool | None = None
        self.model = model
        self.tokenizer = tokenizer
        self.base = getattr(model, model.base_model_prefix)
        self.head = model.get_output_embeddings()
        self.config = model.config
        text_cfg = self.config.get_text_config(decoder=True)
        types = getattr(text_cfg, "layer_types", None) or ["full_attention"]
        sliding = getattr(text_cfg, "use_sliding_window", False) and getattr(text_cfg, "sliding_window", None)
        # Sliding-window layers drop old keys: a cached prefix would not be reusable as is.
        self.reuse_prefixes = all(t == "full_attention" for t in types) and not sliding
        self.cache = PrefixCache(prefix_cache_bytes if self.reuse_prefixes else 0)
        self.stats = EngineStats()
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device

    # ---- building blocks ------------------------------------------------------------
    def _kv_cache(self, entry: PrefixEntry | None, n: int, batch: int = 1):
        from transformers import DynamicCache

        if entry is None or n == 0:
            return DynamicCache(config=self.config)
        data = [(k[:, :, :n], v[:, :, :n]) for k, v in entry.kv]
        cache = DynamicCache(ddp_cache_data=data, config=self.config)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache

    def _run(self, ids: torch.Tensor, cache, attention_mask=None, position_ids=None) -> torch.Tensor:
        self.stats.forward_calls += 1
        out = self.base(input_ids=ids.to(self.device), cache=cache, use_cache=True,
                        attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                        position_ids=None if position_ids is None else position_ids.to(self.device))
        return out.last_hidden_state

    def _lse(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.head(hidden).float(), dim=-1).cpu()

    def _empty(self, ids: torch.Tensor) -> PrefixEntry:
        h = self.config.get_text_config(decoder=True).hidden_size
        return PrefixEntry(ids=ids, kv=[], hidden=torch.zeros((0, h), dtype=self.head.weight.dtype),
                           lse=torch.zeros(0))

    def _prefix(self, ids: torch.Tensor, fresh: bool = False) -> PrefixEntry:
        """The entry for exactly `ids` (1-d), reusing the longest cached prefix; stored when new.
        `fresh`: computed from the first token, and not stored."""
        if ids.numel() == 0:
            return self._empty(ids)
        reuse = self.reuse_prefixes and not fresh
        entry, n = self.cache.lookup(ids) if reuse else (None, 0)
        n = min(n, ids.numel())
        self.cache.reused_tokens += n
        if entry is not None and n == ids.numel():  # all cached: the entry itself or a slice of it (views)
            if n == entry.length:
                return entry
            return PrefixEntry(ids=ids, kv=[(k[:, :, :n], v[:, :, :n]) for k, v in entry.kv],
                               hidden=entry.hidden[:n], lse=entry.lse[:n])
        cache = self._kv_cache(entry, n)
        self.stats.computed_tokens += ids.numel() - n
        hidden = self._run(ids[n:][None], cache)[0].detach()
        old = entry if entry is not None and n else self._empty(ids[:0])
        new = PrefixEntry(ids=ids.clone(), kv=[(layer.keys, layer.values) for layer in cache.layers],
                          hidden=torch.cat([old.hidden[:n].to(hidden.device), hidden]),
                          lse=torch.cat([old.lse[:n], torch.full((ids.numel() - n,), float("nan"))]))
        if reuse:
            self.cache.store(new)
        return new

    def _candidate_rows(self, hidden: torch.Tensor, lse: torch.Tensor, want: torch.Tensor | None,
                        cand: torch.Tensor) -> torch.Tensor:
        """(L, len(cand)) log-probabilities at the wanted positions (NaN rows elsewhere).

        `lse` is filled in place where it is still NaN at a wanted position (a cached
        entry's normalisers are computed once)."""
        n = hidden.shape[0]
        idx = torch.arange(n) if want is None else want.nonzero()[:, 0]
        out = torch.full((n, cand.numel()), float("nan"))
        if idx.numel() == 0:
            return out
        todo = idx[torch.isnan(lse[idx])]
        if todo.numel():
            lse[todo] = self._lse(hidden[todo])
        w = self.head.weight[cand.to(self.head.weight.device)]
        b = None if getattr(self.head, "bias", None) is None else self.head.bias[cand]
        out[idx] = F.linear(hidden[idx], w, b).float().cpu() - lse[idx][:, None]
        return out

    def _fill_lse(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
        """Fill each part's `lse` (hidden [L, h], lse [L], wanted [L] or None) in place where it is NaN at a wanted
        position, the rows of several parts in shared head calls of at most `LSE_ROWS` rows.

        The normaliser needs the whole unembedding (Qwen2.5's 151,936 x 1,536: a 1-row call reads all 467 MB of
        it and cost the judge ~55 ms per request, ~30% of its CPU on the 2-core Xeon); one call for 32 rows costs
        ~3x a 1-row call. A part with more than `LSE_ROWS` rows keeps its own call, as before: the head's
        matmul gives each row the same bits in any call of up to 32 rows (tested, `test_pooled_normalisers_
        are_the_per_request_ones`), not beyond."""
        if not self._pooling_is_exact():
            for hidden, lse, want in parts:
                idx = torch.arange(hidden.shape[0]) if want is None else want.nonzero()[:, 0]
                idx = idx[torch.isnan(lse[idx])]
                if idx.numel():
                    lse[idx] = self._lse(hidden[idx])
            return
        pooled: list[tuple[torch.Tensor, torch.Tensor]] = []   # (lse, positions) whose rows go in shared calls
        rows: list[torch.Tensor] = []
        for hidden, lse, want in parts:
            idx = torch.arange(hidden.shape[0]) if want is None else want.nonzero()[:, 0]
            idx = idx[torch.isnan(lse[idx])]
            if idx.numel() > LSE_ROWS:
                lse[idx] = self._lse(hidden[idx])
            elif idx.numel():
                pooled.append((lse, idx))
                rows.append(hidden[idx])
        if not rows:
            return
        x = torch.cat(rows)
        got = torch.cat([self._lse(x[i:i + LSE_ROWS]) for i in range(0, x.shape[0], LSE_ROWS)])
        k = 0
        for lse, idx in pooled:
            lse[idx] = got[k:k + idx.numel()]
            k += idx.numel()

    def _pooling_is_exact(self) -> bool:
        """Whether the head gives a row the same bits in a call of 1, 16 or 32 rows on this machine (probed once on
        32 random rows: bf16 on the AMX Xeon is; float32 (MKL) is not even for 2 rows)."""
        if self._pool_exact is None:
            w = self.head.weight
            g = torch.Generator().manual_seed(0)
            x = torch.randn((LSE_ROWS, w.shape[1]), generator=g).to(w.dtype).to(w.device)
            with torch.no_grad():
                whole = self.head(x)
                parts = torch.cat([self.head(x[:1]), self.head(x[1:LSE_ROWS // 2]), self.head(x[LSE_ROWS // 2:])])
            self._pool_exact = bool(torch.equal(whole, parts))
        return self._pool_exact

    @staticmethod
    def _groups(prompts: list[torch.Tensor], fresh: bool) -> list[list[int]]:
        """The groups a call computes together: by shared prefix (`group_prompts`), or one prompt each when `fresh`."""
        return [[i] for i in range(len(prompts))] if fresh else group_prompts(prompts)

    @staticmethod
    def _split(prompts: list[torch.Tensor], group: list[int]) -> int:
        """Length of the group's common prefix, leaving each member at least one token to compute."""
        c = min(prompts[i].numel() for i in group) - 1
        first = prompts[group[0]]
        for i in group[1:]:
            c = min(c, common_prefix(first, prompts[i]))
        return max(c, 0)

    def _continuations(self, prompts, group, c, prefix: PrefixEntry, pad: int):
        conts = [prompts[i][c:] for i in group]
        width = max(x.numel() for x in conts)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        for r, x in enumerate(conts):
            ids[r, :x.numel()] = x
        cache = self._kv_cache(prefix, c, batch=len(group))
        return conts, ids, cache

    # ---- prompt log-probabilities ----------------------------------------------------
    @torch.no_grad()
    def logprobs(self, prompts: list[list[int]], candidate_ids: list[int],
                 wanted: list[list[bool] | None] | None = None, fresh: bool = False) -> list[torch.Tensor]:
        """(len(prompt_i), len(candidate_ids)) float32 log-probabilities for each prompt.

        `wanted[i]`, when given, marks the positions of prompt i whose next-token
        log-probabilities are needed; the others come back as NaN rows and cost nothing
        (the full-vocabulary normaliser is the price of a position). `fresh`: each prompt
        alone and from scratch (module docstring)."""
        with self.lock:
            ps = [torch.tensor(p, dtype=torch.long) for p in prompts]
            wants = [None if w is None else torch.tensor(w, dtype=torch.bool) for w in (wanted or [None] * len(ps))]
            cand = torch.tensor(candidate_ids, dtype=torch.long)
            self.stats.prompt_tokens += sum(p.numel() for p in ps)
            results: list[torch.Tensor | None] = [None] * len(ps)
            for group in self._groups(ps, fresh):
                if len(group) == 1:
                    i = group[0]
                    e = self._prefix(ps[i], fresh)
                    results[i] = self._candidate_rows(e.hidden, e.lse, wants[i], cand)
                    continue
                c = self._split(ps, group)
                prefix = self._prefix(ps[group[0]][:c])
                conts, ids, cache = self._continuations(ps, group, c, prefix, pad=0)
                self.stats.computed_tokens += sum(x.numel() for x in conts)
                hidden = self._run(ids, cache)
                tails = [(hidden[r, :x.numel()], torch.full((x.numel(),), float("nan")),
                          None if wants[i] is None else wants[i][c:]) for r, (i, x) in enumerate(zip(group, conts))]
                if self.pool_normalisers:
                    self._fill_lse(tails)    # every member's normalisers in shared head calls
                for i, (h, lse, w_tail) in zip(group, tails):
                    w = wants[i]
                    head = self._candidate_rows(prefix.hidden, prefix.lse, None if w is None else w[:c], cand)
                    tail = self._candidate_rows(h, lse, w_tail, cand)
                    results[i] = torch.cat([head, tail])
            return results  # type: ignore[return-value]

    # ---- generation ----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 stop: list[str] | None = None, eos_ids: set[int] | None = None,
                 pad: int = 0, fresh: bool = False) -> list[list[int]]:
        """The generated ids of each prompt (end-of-sequence and anything after a stop string excluded
        from generation; the caller cuts the text at the stop string). `fresh`: each prompt alone and
        from scratch (module docstring)."""
        with self.lock:
            ps = [torch.tensor(p, dtype=torch.long) for p in prompts]
            self.stats.prompt_tokens += sum(p.numel() for p in ps)
            out: list[list[int] | None] = [None] * len(ps)
            for group in self._groups(ps, fresh):
                c = self._split(ps, group)
                prefix = self._prefix(ps[group[0]][:c], fresh)
                for i, ids in zip(group, self._generate_group(ps, group, c, prefix, max_new_tokens, temperature,
                                                              stop or [], eos_ids or set(), pad)):
                    out[i] = ids
            return out  # type: ignore[return-value]

    def _generate_group(self, ps, group, c, prefix, max_new, temperature, stop, eos, pad):
        conts, ids, cache = self._continuations(ps, group, c, prefix, pad)
        lens = torch.tensor([x.numel() for x in conts])
        b, width = ids.shape
        self.stats.computed_tokens += int(lens.sum())
        mask = torch.ones((b, c + width), dtype=torch.long)
        for r, n in enumerate(lens.tolist()):
            mask[r, c + n:] = 0
        pos = (c + torch.arange(width))[None].repeat(b, 1)
        hidden = self._run(ids, cache, mask, pos)
        last = hidden[torch.arange(b), lens - 1]
        gen: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max_new):
            logits = self.head(last).float()
            if temperature and temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)[:, 0]
            else:
                nxt = logits.argmax(dim=-1)
            for r, t in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                if t in eos:
                    done[r] = True
                    continue
                gen[r].append(t)
                self.stats.generated_tokens += 1
                if stop and any(s in self.tokenizer.decode(gen[r][-16:], skip_special_tokens=True) for s in stop):
                    done[r] = True
            if all(done) or step == max_new - 1:
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
            pos = (c + lens + step)[:, None]
            last = self._run(nxt.cpu()[:, None], cache, mask, pos)[:, -1]
        return gen


_ENGINES: dict[tuple, tuple[object, LocalEngine]] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(key: tuple, load, prefix_cache_bytes: int) -> tuple[object, LocalEngine]:
    """(loaded model, engine) for `key`, loaded by `load()` once per process and shared."""
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            loaded = load()
            _ENGINES[key] = (loaded, LocalEngine(loaded.model, loaded.tokenizer, prefix_cache_bytes))
        return _ENGINES[key]


def release_engines() -> None:
    """Drop every shared model and its prefix cache (frees their memory)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()
