"""A bounded store of computed prompt prefixes for the local back end, keyed by token ids.

An entry holds, for a token-id sequence, the attention keys/values of every layer and,
when it was computed for log-probabilities, the final hidden state and the log of the
softmax normaliser at every position. A later prompt that starts with the same ids
(for any number of them) reuses that work exactly: the keys/values of position i
depend only on tokens 0..i. `lookup` returns the entry sharing the longest prefix;
entries are evicted least-recently-used once their total size exceeds `max_bytes`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PrefixEntry:
    ids: torch.Tensor                          # (L,) int64
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape (1, heads, L, head_dim)
    hidden: torch.Tensor | None = None         # (L, hidden): final (normed) hidden states
    lse: torch.Tensor | None = None            # (L,) float32: logsumexp of the logits at each position

    @property
    def length(self) -> int:
        return int(self.ids.numel())

    @property
    def has_logprobs(self) -> bool:
        return self.hidden is not None and self.lse is not None

    @property
    def nbytes(self) -> int:
        n = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)
        for t in (self.hidden, self.lse):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading positions where two 1-d id tensors agree."""
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


class PrefixCache:
    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, PrefixEntry] = OrderedDict()
        self.bytes = 0
        self.hits = 0           # lookups that reused at least one position
        self.lookups = 0
        self.reused_tokens = 0  # positions taken from the cache instead of computed

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def lookup(self, ids: torch.Tensor, need_logprobs: bool = False) -> tuple[PrefixEntry | None, int]:
        """(entry, n): the entry sharing the longest prefix with ids, and that prefix's length."""
        self.lookups += 1
        best, best_n = None, 0
        for key, entry in self._entries.items():
            if need_logprobs and not entry.has_logprobs:
                continue
            n = common_prefix(entry.ids, ids)
            if n > best_n:
                best, best_n = key, n
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        self.hits += 1
        return self._entries[best], best_n

    def store(self, entry: PrefixEntry) -> None:
        if self.max_bytes <= 0 or entry.nbytes > self.max_bytes:
            return
        key = tuple(entry.ids.tolist())
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
            if old.has_logprobs and not entry.has_logprobs:
                entry = old  # keep the richer entry
        # an entry that is a prefix of the new one (with no more information) is now redundant
        for k in [k for k, e in self._entries.items()
                  if e.length < entry.length and (entry.has_logprobs or not e.has_logprobs)
                  and common_prefix(e.ids, entry.ids) == e.length]:
            self.bytes -= self._entries.pop(k).nbytes
        self._entries[key] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.nbytes
