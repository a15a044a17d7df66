"""Local in-process back end through transformers (the embedded models, or any HF causal LM folder).

Requests arriving together are batched: a worker collects up to `batch_size`
requests (waiting at most `batch_wait_ms` for more) and hands them to the process's
shared `LocalEngine` (`local_engine.py`), which reuses the keys/values of any prompt
prefix it has already computed (system prompt, worked examples, explanation), computes
a batch's common prefix once and the rest of each prompt in one padded batch. That moves
a result's last bits with whatever else was in flight; `deterministic: true` computes every
prompt alone and from scratch instead (slower where prompts share prefixes), so that a run
gives the same bits on a loaded machine as on an idle one (with `threads` pinned).
`prompt_logprobs` returns exact log-probabilities of every candidate at every position
(candidates must be single tokens of the model's vocabulary; others are left out, as
an API leaves out candidates outside its top-N).

One model per process: every `LocalClient.from_cfg` with the same model folder, dtype
and device shares one loaded model and one prefix cache (explain, score and tag in
`safesail run`). `threads` sets torch's intra-op threads for the process: null (or
"auto") takes the cores that other processes' runnable threads leave free (on the loaded,
shared 2-core machine 1 thread was 1.8x faster than 2; BENCHMARKS.md, "Local LLM back end").
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from safesail.config_types import LLMConfig, load_group
from safesail.errors import UserError
from safesail.interpret.clients.base import ChatRequest, Completion, LLMClient, LLMError, PromptLogprobs
from safesail.interpret.clients.local_engine import LocalEngine, shared_engine
from safesail.interpret.clients.registry import register_backend

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    kind: str                      # "chat" | "logprobs"
    ids: list[int]
    future: asyncio.Future = field(repr=False)
    req: ChatRequest | None = None
    cand_ids: tuple[int, ...] = ()
    wanted: list[bool] | None = None   # logprobs: the positions asked for (None: all)

    @property
    def group_key(self) -> tuple:
        if self.kind == "logprobs":
            return ("logprobs", self.cand_ids)
        r = self.req
        return ("chat", r.max_tokens, r.temperature, tuple(r.stop or ()))


def busy_elsewhere(samples: int = 5, interval_s: float = 0.02) -> float:
    """Runnable threads of other processes right now (mean of a few samples of /proc), or the
    1-minute load average where /proc is not readable. This process's own threads (e.g. a
    previous stage's) do not count: they will not compete with the LLM."""
    try:
        vals = []
        for _ in range(samples):
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            own = 0
            for st in Path("/proc/self/task").glob("*/stat"):
                try:
                    own += st.read_text().rsplit(")", 1)[1].split()[0] == "R"
                except (OSError, IndexError):
                    pass
            vals.append(max(0, running - own))
            time.sleep(interval_s)
        return sum(vals) / len(vals)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def pick_threads(setting: Any) -> int | None:
    """torch threads for a `threads` setting: an int; null or "auto" (the cores other processes leave free);
    "keep" (None: leave torch's setting alone)."""
    if str(setting) == "keep":
        return None
    cores = os.cpu_count() or 1
    if setting in (None, "", "auto"):
        return max(1, min(cores, math.floor(cores - busy_elsewhere() + 0.5)))
    try:
        n = int(setting)
    except (TypeError, ValueError):
        raise UserError(f"llm.threads={setting!r} is not a number; use a positive integer, null (auto) or keep.") from None
    if n < 1:
        raise UserError(f"llm.threads={n} must be at least 1 (or null for auto, keep to leave it).")
    return n


@register_backend("local")
class LocalClient(LLMClient):
    supports_prompt_logprobs = True

    def __init__(self, model, tokenizer, model_name: str, context_window: int = 2048, batch_size: int = 4,
                 batch_wait_ms: float = 20, identity: dict | None = None, engine: LocalEngine | None = None,
                 prefix_cache_mb: float = 512, deterministic: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_window = int(context_window)
        self.batch_size = max(1, int(batch_size))
        self.batch_wait_s = float(batch_wait_ms) / 1000
        self.deterministic = bool(deterministic)   # each prompt alone, from scratch (module docstring)
        self._identity = identity or {}
        self.engine = engine or LocalEngine(model, tokenizer, int(float(prefix_cache_mb) * (1 << 20)))
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes of the engine batches run (for logs and tests)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self._stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id,
                          *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}

    @dataclass
    class Settings(LLMConfig):
        """The keys of an `llm` group with `backend: local` (defaults: configs/llm/local.yaml, qwen-coder-*.yaml).
        `model` is a model config group (configs/model/*.yaml); `threads`: null, an integer or keep."""
        model: dict
        batch_size: int
        batch_wait_ms: float
        threads: Union[None, int, str]
        prefix_cache_mb: float
        deterministic: bool

    @classmethod
    def from_cfg(cls, cfg, cache_dir: str | Path | None = None, device: str = "cpu") -> "LocalClient":
        """From an `llm` config group (every key checked by its type; defaults only in the YAML)."""
        return cls.from_settings(load_group(cfg, cls.Settings, "llm"), cache_dir=cache_dir, device=device)

    @classmethod
    def from_settings(cls, s: "LocalClient.Settings", cache_dir: str | Path | None = None,
                      device: str = "cpu") -> "LocalClient":
        from omegaconf import OmegaConf

        from safesail.models import load_model
        from safesail.models.loading import model_folder, resolve_device, resolve_dtype

        threads = pick_threads(s.threads)
        if threads is not None and threads != torch.get_num_threads():
            log.info("local LLM: %d torch thread(s) (llm.threads=%s)", threads, s.threads)
            torch.set_num_threads(threads)
        cache_dir = cache_dir or os.environ.get("SAFESAIL_CACHE", Path.home() / ".cache" / "safesail")
        model_cfg = OmegaConf.create(s.model)
        dev = resolve_device(device)
        folder = model_folder(model_cfg, cache_dir)
        key = (str(Path(folder).resolve()) if Path(folder).exists() else folder,
               str(resolve_dtype(model_cfg.get("dtype"), dev)), str(dev))
        loaded, engine = shared_engine(key, lambda: load_model(model_cfg, dev, cache_dir=cache_dir),
                                       int(s.prefix_cache_mb * (1 << 20)))
        name = s.name or loaded.name
        ident = {"backend": "local", "model": name, "path": Path(loaded.path).name, "dtype": str(loaded.dtype)}
        return cls(loaded.model, loaded.tokenizer, name, context_window=s.context_window, batch_size=s.batch_size,
                   batch_wait_ms=s.batch_wait_ms, identity=ident, engine=engine, deterministic=s.deterministic)

    def cache_identity(self) -> dict[str, Any]:
        return {"backend": "local", "model": self.model_name, **self._identity}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        return self.tokenizer(self.chat_prompt(messages), add_special_tokens=False)["input_ids"]

    def count_message_tokens(self, messages: list[dict]) -> int:
        return len(self.encode_messages(messages))

    # ---- requests ----------------------------------------------------------------
    async def chat(self, req: ChatRequest) -> Completion:
        ids = self.encode_messages(req.messages)
        if len(ids) + req.max_tokens > self.context_window:
            raise LLMError("context_overflow", f"prompt of {len(ids)} tokens + {req.max_tokens} reply tokens "
                                               f"exceeds the context window of {self.context_window}")
        text, n_out = await self._submit(_Pending("chat", ids, self._future(), req=req))
        text = _apply_stop(text, req.stop)
        if not text.strip():
            raise LLMError("empty_reply", "the model generated no text")
        return Completion(text=text, model=self.model_name, prompt_tokens=len(ids), completion_tokens=n_out)

    async def prompt_logprobs(self, prompt: str, candidates: list[str],
                              slots_ending_with: str | None = None) -> PromptLogprobs:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > self.context_window:
            raise LLMError("context_overflow", f"prompt of {len(ids)} tokens exceeds the context window "
                                               f"of {self.context_window}")
        if not ids:
            raise LLMError("bad_request", "the prompt is empty")
        cand_ids: dict[str, int] = {}
        for c in candidates:
            toks = self.tokenizer(c, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:  # only single-token candidates have a next-token probability
                cand_ids[c] = toks[0]
            elif toks:
                log.debug("candidate %r is %d tokens, not one; left out", c, len(toks))
        names = list(cand_ids)
        tokens = [self.tokenizer.convert_tokens_to_string([t]) for t in self.tokenizer.convert_ids_to_tokens(ids)]
        wanted = [t.endswith(slots_ending_with) for t in tokens] if slots_ending_with else None
        logp = await self._submit(_Pending("logprobs", ids, self._future(), wanted=wanted,
                                           cand_ids=tuple(cand_ids[c] for c in names)))
        nxt = [{} if math.isnan(row[0]) else {c: float(v) for c, v in zip(names, row)} for row in logp.tolist()] \
            if names else [{} for _ in ids]
        return PromptLogprobs(tokens=tokens, next_logprobs=nxt, prompt_tokens=len(ids))

    # ---- the batching worker ---------------------------------------------------------
    def _future(self) -> asyncio.Future:
        self._start()
        return asyncio.get_running_loop().create_future()

    async def _submit(self, p: _Pending):
        await self._queue.put(p)
        return await p.future

    def _start(self) -> None:
        """Queue and batching worker belong to the running event loop (a new one per asyncio.run)."""
        loop = asyncio.get_running_loop()
        if getattr(self, "_loop", None) is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = None
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.batch_size:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple, list[_Pending]] = {}
            for p in batch:  # requests that share settings go into one engine call
                groups.setdefault(p.group_key, []).append(p)
            for group in groups.values():
                live = [p for p in group if not p.future.cancelled()]
                if live:
                    await self._serve(live)

    async def _serve(self, live: list[_Pending]) -> None:
        try:
            results = await asyncio.to_thread(self._compute, live)
            self.batches.append(len(live))
        except Exception as e:  # noqa: BLE001 - handed to every waiter
            err = e if isinstance(e, LLMError) else LLMError("other", f"{type(e).__name__}: {e}")
            for p in live:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        for p, res in zip(live, results):
            if not p.future.done():
                p.future.set_result(res)

    def _compute(self, live: list[_Pending]) -> list:
        if live[0].kind == "logprobs":
            return self.engine.logprobs([p.ids for p in live], list(live[0].cand_ids), [p.wanted for p in live],
                                        fresh=self.deterministic)
        req = live[0].req
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        gen = self.engine.generate([p.ids for p in live], int(req.max_tokens), float(req.temperature or 0.0),
                                   stop=list(req.stop or []), eos_ids=self._stop_ids, pad=pad,
                                   fresh=self.deterministic)
        return [(self.tokenizer.decode(g, skip_special_tokens=True), len(g)) for g in gen]

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._worker = None


def _apply_stop(text: str, stop: list[str] | None) -> str:
    for s in stop or []:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text
