"""Local in-process back end through transformers (the default: embedded SmolLM2-135M-Instruct).

Chat requests arriving together are batched: a worker collects up to
`batch_size` requests (waiting at most `batch_wait_ms` for more), left-pads
them and runs one `generate` call in a worker thread. `prompt_logprobs` runs
one forward pass and returns exact log-probabilities of every candidate at
every position (candidates must be single tokens of the model's vocabulary;
others are left out, as an API leaves out candidates outside its top-N).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safesail.interpret.clients.base import ChatRequest, Completion, LLMClient, LLMError, PromptLogprobs

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    req: ChatRequest
    ids: list[int]
    future: asyncio.Future = field(repr=False)


class LocalClient(LLMClient):
    supports_prompt_logprobs = True

    def __init__(self, model, tokenizer, model_name: str, context_window: int = 2048, batch_size: int = 4,
                 batch_wait_ms: float = 20, identity: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context_window = int(context_window)
        self.batch_size = max(1, int(batch_size))
        self.batch_wait_s = float(batch_wait_ms) / 1000
        self._identity = identity or {}
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._model_lock: asyncio.Lock | None = None
        self.batches: list[int] = []  # sizes of the generate() batches run (for logs and tests)

    @classmethod
    def from_cfg(cls, cfg, cache_dir: str | Path | None = None, device: str = "cpu") -> "LocalClient":
        from safesail.models import load_model

        loaded = load_model(cfg.model, device, cache_dir=cache_dir)
        name = str(cfg.get("name") or loaded.name)
        window = int(cfg.get("context_window") or cfg.model.get("max_length") or 2048)
        ident = {"backend": "local", "model": name, "path": Path(loaded.path).name, "dtype": str(loaded.dtype)}
        return cls(loaded.model, loaded.tokenizer, name, context_window=window,
                   batch_size=int(cfg.get("batch_size", 4)), batch_wait_ms=float(cfg.get("batch_wait_ms", 20)),
                   identity=ident)

    def cache_identity(self) -> dict[str, Any]:
        return {"backend": "local", "model": self.model_name, **self._identity}

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_messages(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_message_tokens(self, messages: list[dict]) -> int:
        return len(self.encode_messages(messages))

    # ---- chat: batched generation ---------------------------------------------
    async def chat(self, req: ChatRequest) -> Completion:
        ids = self.encode_messages(req.messages)
        if len(ids) + req.max_tokens > self.context_window:
            raise LLMError("context_overflow", f"prompt of {len(ids)} tokens + {req.max_tokens} reply tokens "
                                               f"exceeds the context window of {self.context_window}")
        self._start()
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(req, ids, fut))
        return await fut

    def _bind(self) -> None:
        """Queue, lock and batching worker belong to the running event loop (a new one per asyncio.run)."""
        loop = asyncio.get_running_loop()
        if getattr(self, "_loop", None) is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._model_lock = asyncio.Lock()
            self._worker = None

    def _start(self) -> None:
        self._bind()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.batch_size:
                # Requests that share generation settings go into one generate() call.
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                batch.append(nxt)
            groups: dict[tuple, list[_Pending]] = {}
            for p in batch:
                groups.setdefault((p.req.max_tokens, p.req.temperature, tuple(p.req.stop or ())), []).append(p)
            for group in groups.values():
                live = [p for p in group if not p.future.cancelled()]
                if not live:
                    continue
                try:
                    async with self._model_lock:
                        results = await asyncio.to_thread(self._generate, [p.ids for p in live], live[0].req)
                    self.batches.append(len(live))
                except Exception as e:  # noqa: BLE001 - handed to every waiter
                    err = e if isinstance(e, LLMError) else LLMError("other", f"{type(e).__name__}: {e}")
                    for p in live:
                        if not p.future.done():
                            p.future.set_exception(err)
                    continue
                for p, (text, n_out) in zip(live, results):
                    if p.future.done():
                        continue
                    text = _apply_stop(text, p.req.stop)
                    if not text.strip():
                        p.future.set_exception(LLMError("empty_reply", "the model generated no text"))
                    else:
                        p.future.set_result(Completion(text=text, model=self.model_name, prompt_tokens=len(p.ids),
                                                       completion_tokens=n_out))

    def _generate(self, batch_ids: list[list[int]], req: ChatRequest) -> list[tuple[str, int]]:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        width = max(len(x) for x in batch_ids)
        dev = next(self.model.parameters()).device
        input_ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for i, ids in enumerate(batch_ids):  # left padding
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        kw: dict[str, Any] = dict(max_new_tokens=int(req.max_tokens), pad_token_id=pad)
        if req.stop:  # each sequence of the batch stops at its first stop string (text after it is cut below)
            kw.update(stop_strings=list(req.stop), tokenizer=tok)
        if req.temperature and req.temperature > 0:
            kw.update(do_sample=True, temperature=float(req.temperature), top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), **kw)
        gen = out[:, width:].cpu()
        results = []
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
        for row in gen.tolist():
            n = 0
            for t in row:
                if t in eos or t == pad:
                    break
                n += 1
            results.append((tok.decode(row[:n], skip_special_tokens=True), n))
        return results

    # ---- prompt log-probabilities: one forward pass ------------------------------
    async def prompt_logprobs(self, prompt: str, candidates: list[str]) -> PromptLogprobs:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > self.context_window:
            raise LLMError("context_overflow", f"prompt of {len(ids)} tokens exceeds the context window "
                                               f"of {self.context_window}")
        cand_ids = {}
        for c in candidates:
            toks = self.tokenizer(c, add_special_tokens=False)["input_ids"]
            if not toks:
                continue
            if len(toks) > 1:  # only single-token candidates have a next-token probability
                log.debug("candidate %r is %d tokens, not one; left out", c, len(toks))
                continue
            cand_ids[c] = toks[0]
        self._bind()
        async with self._model_lock:
            logp = await asyncio.to_thread(self._forward_logprobs, ids)
        names = list(cand_ids)
        col = torch.tensor([cand_ids[c] for c in names], dtype=torch.long)
        picked = logp[:, col] if names else torch.empty((len(ids), 0))
        nxt = [{c: float(v) for c, v in zip(names, row)} for row in picked.tolist()]
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        tokens = [self.tokenizer.convert_tokens_to_string([t]) for t in tokens]
        return PromptLogprobs(tokens=tokens, next_logprobs=nxt, prompt_tokens=len(ids))

    def _forward_logprobs(self, ids: list[int]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu()

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
