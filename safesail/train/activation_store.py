"""Read an activation cache (`runs/<name>/activations/<hook>/`): the trainer's input.

The format is described in docs/activation-cache.md. In short: `meta.json` plus
safetensors shards `w<first window>.safetensors`, each holding whole windows
of `ctx_len` tokens: `activations [T, d]`, `tokens`, `doc_ids`, `positions`
(int32 [T]), `special` (bool [T]) and `windows` (int64 [W], T = W * ctx_len).

Windows whose index satisfies `index % eval_every == eval_every - 1` form the
held-out "eval" split; the others are "train".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from safesail.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "safesail-activations"
VERSION = 1
SPLITS = ("train", "eval", "all")
DEFAULT_BUFFER_BYTES = 512 << 20


def split_of(window_index: int | torch.Tensor, eval_every: int):
    """True where a window belongs to the eval split (works on ints and tensors)."""
    return window_index % eval_every == eval_every - 1


def load_shard(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (keys or f.keys())}
    except (SafetensorError, FileNotFoundError) as e:  # damaged after the cache was opened
        raise UserError(f"shard {path.name} of the activation cache at {path.parent} cannot be read "
                        f"({str(e).splitlines()[0][:120]}); run `safesail cache` again with the same settings to "
                        "recompute it.") from None


_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def shard_problem(path: Path, expected_bytes: int | None = None) -> str | None:
    """What makes a shard unreadable (missing, cut short, damaged header), or None if it is whole.

    Cheap: one stat and a read of the safetensors header, whose tensor offsets give the size
    the file must have; `expected_bytes` (from the writer's progress log) is checked as well.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if expected_bytes is not None and size != int(expected_bytes):
        return f"is cut short or damaged ({size:,} bytes, written with {int(expected_bytes):,})"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > _MAX_HEADER or n > size - 8:
            return f"is cut short or damaged (a {size:,}-byte file without a whole safetensors header)"
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "has a damaged safetensors header"
    if size != 8 + n + end:
        return f"is cut short or damaged ({size:,} bytes, its header describes {8 + n + end:,})"
    return None


class ActivationStore:
    """One hook point's cached activations, served as shuffled batches with bounded memory."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise UserError(f"no activation cache at {self.folder} (meta.json is missing); run `safesail cache` "
                            "first or fix the run name.")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{meta_path} is not valid JSON; delete the folder and run `safesail cache` again.") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{self.folder} is not a Safe-SAIL activation cache (meta.json has no "
                            f"format={FORMAT!r}); point at a folder written by `safesail cache`.")
        if int(meta.get("version", 0)) > VERSION:
            raise UserError(f"the activation cache at {self.folder} has format version {meta.get('version')}, newer "
                            f"than this Safe-SAIL reads ({VERSION}); upgrade Safe-SAIL.")
        if meta.get("status") != "complete":
            raise UserError(f"the activation cache at {self.folder} is incomplete; re-run `safesail cache` with the "
                            "same settings to finish it.")
        for shard in meta["shards"]:
            problem = shard_problem(self.folder / shard["file"], shard.get("bytes"))
            if problem:
                raise UserError(f"shard {shard['file']} of the activation cache at {self.folder} {problem}; run "
                                "`safesail cache` again with the same settings to recompute it.")
        self.meta = meta

    @classmethod
    def open(cls, run_root: str | Path, hook: str) -> "ActivationStore":
        from safesail.rundir import RunDir

        return cls(RunDir(Path(run_root)).activations(hook))

    # ---- description -----------------------------------------------------------------
    @property
    def d(self) -> int:
        return int(self.meta["d"])

    @property
    def hook(self) -> str:
        return str(self.meta["hook"])

    @property
    def ctx_len(self) -> int:
        return int(self.meta["ctx_len"])

    @property
    def eval_every(self) -> int:
        return int(self.meta["eval_every"])

    @property
    def num_tokens(self) -> int:
        """All stored tokens, both splits, special tokens included."""
        return int(self.meta["num_tokens"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["dtype"])

    def split_tokens(self, split: str = "train", drop_special: bool = True) -> int:
        """How many activation rows `iter_batches(split=..., drop_special=...)` draws from."""
        _check_split(split)
        parts = ("train", "eval") if split == "all" else (split,)
        key = "nonspecial" if drop_special else "tokens"
        return sum(int(self.meta["splits"][p][key]) for p in parts)

    def num_batches(self, batch_size: int, split: str = "train", drop_special: bool = True,
                    drop_last: bool = True) -> int:
        n = self.split_tokens(split, drop_special)
        return n // batch_size if drop_last else -(-n // batch_size)

    def shard_paths(self) -> list[Path]:
        """Shards in order of their first window."""
        return [self.folder / s["file"] for s in self.meta["shards"]]

    # ---- reading -----------------------------------------------------------------------
    def _rows(self, path: Path, split: str, drop_special: bool) -> torch.Tensor:
        sh = load_shard(path, ("activations", "windows", "special"))
        keep = self._row_mask(sh, split, drop_special)
        acts = sh["activations"]
        return acts if bool(keep.all()) else acts[keep]

    def _row_mask(self, sh: dict[str, torch.Tensor], split: str, drop_special: bool) -> torch.Tensor:
        in_eval = split_of(sh["windows"], self.eval_every)
        if split == "train":
            win_keep = ~in_eval
        elif split == "eval":
            win_keep = in_eval
        else:
            win_keep = torch.ones_like(in_eval)
        keep = win_keep.repeat_interleave(self.ctx_len)
        if drop_special:
            keep = keep & ~sh["special"]
        return keep

    def iter_batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, start_batch: int = 0,
                     split: str = "train", drop_special: bool = True, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                     drop_last: bool = True, buffer_tokens: int | None = None) -> Iterator[torch.Tensor]:
        """Batches `[batch_size, d]` of activation rows: one pass over the split.

        Shuffled (for a given `seed`, always the same order) by visiting shards in a random
        order and mixing rows in a buffer of at most `buffer_tokens` rows (default: 512 MiB
        worth). Batches are numbered 0, 1, 2, ... for all ranks together; rank `r` of
        `world_size` gets those with number % world_size == r, and `start_batch` skips the
        numbers below it (resume exactly where a run stopped).
        """
        _check_split(split)
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        cap = int(buffer_tokens or max(batch_size * 4, DEFAULT_BUFFER_BYTES // (self.d * itemsize)))
        cap = max(cap, 2 * batch_size)
        gen = torch.Generator().manual_seed(int(seed))
        paths = self.shard_paths()
        if shuffle:
            paths = [paths[i] for i in torch.randperm(len(paths), generator=gen).tolist()]
        number = 0

        def emit(rows: torch.Tensor, count: int):
            nonlocal number
            for i in range(0, count, batch_size):
                if number >= start_batch and number % world_size == rank:
                    yield rows[i:i + batch_size].to(device=device, dtype=dtype)
                number += 1

        buf: list[torch.Tensor] = []
        held = 0
        for path in paths:
            rows = self._rows(path, split, drop_special)
            if rows.shape[0] == 0:
                continue
            buf.append(rows)
            held += rows.shape[0]
            if held < cap and shuffle:
                continue
            rows = torch.cat(buf)
            if shuffle:
                rows = rows[torch.randperm(rows.shape[0], generator=gen)]
                out = ((held - cap // 2) // batch_size) * batch_size if held >= cap else 0
            else:
                out = (held // batch_size) * batch_size
            yield from emit(rows, out)
            buf, held = [rows[out:]], held - out
        if held:
            rows = torch.cat(buf)
            if shuffle:
                rows = rows[torch.randperm(rows.shape[0], generator=gen)]
            out = held if not drop_last else (held // batch_size) * batch_size
            yield from emit(rows, out)

    def iter_shards(self, split: str = "all") -> Iterator[dict[str, torch.Tensor]]:
        """Every shard's tensors (rows of the split only), shards in order of their first window."""
        _check_split(split)
        for path in self.shard_paths():
            sh = load_shard(path)
            if split != "all":
                keep = self._row_mask(sh, split, drop_special=False)
                win = split_of(sh["windows"], self.eval_every)
                sh = {k: (v[keep] if k != "windows" else v[win if split == "eval" else ~win])
                      for k, v in sh.items()}
            yield sh

    def iter_token_windows(self, split: str = "eval") -> Iterator[torch.Tensor]:
        """Token ids `[ctx_len]` (int64) of every window of the split, in window order."""
        _check_split(split)
        found: list[tuple[int, torch.Tensor]] = []
        for path in self.shard_paths():
            sh = load_shard(path, ("windows", "tokens"))
            toks = sh["tokens"].view(-1, self.ctx_len)
            for j, w in enumerate(sh["windows"].tolist()):
                ev = bool(split_of(w, self.eval_every))
                if split == "all" or (split == "eval") == ev:
                    found.append((w, toks[j]))
        found.sort(key=lambda t: t[0])
        for _, toks in found:
            yield toks.to(torch.int64)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
