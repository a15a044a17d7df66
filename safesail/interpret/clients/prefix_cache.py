"""A bounded store of computed prompt prefixes for the local back end, keyed by token ids.

An entry holds, for a token-id sequence, the attention keys/values of every layer, the
final hidden state at every position, and the log of the softmax normaliser at the
positions where it was needed so far (NaN elsewhere; filled in when asked for). A later prompt that starts with the same ids
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
    hidden: torch.Tensor                       # (L, hidden): final (normed) hidden states
    lse: torch.Tensor                          # (L,) float32: logsumexp of the logits; NaN = not computed yet

    @property
    def length(self) -> int:
        return int(self.ids.numel())

    @property
    def nbytes(self) -> int:
        n = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)
        return n + sum(t.numel() * t.element_size() for t in (self.hidden, self.lse))


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

    def lookup(self, ids: torch.Tensor) -> tuple[PrefixEntry | None, int]:
        """(entry, n): the entry sharing the longest prefix with ids, and that prefix's length."""
        self.lookups += 1
        best, best_n = None, 0
        for key, entry in self._entries.items():
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
        # entries that are a prefix of the new one (or the same ids) are now redundant: keep their normalisers
        for k in [k for k, e in self._entries.items()
                  if e.length <= entry.length and common_prefix(e.ids, entry.ids) == e.length]:
            e = self._entries.pop(k)
            self.bytes -= e.nbytes
            head = entry.lse[:e.length]
            head.copy_(torch.where(torch.isnan(head), e.lse, head))
        self._entries[key] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.nbytes
