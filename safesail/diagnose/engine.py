"""The diagnose engine: a query in, every token with the safety latents firing on it out.

Loaded once (model, the neuron database, its SAEs and normalisers), then per query:
chat template -> generate the answer -> one forward pass over query + answer that
stops after the last hooked layer -> SAE codes of the database's latents ->
normalized activation (activation / 0.999 quantile) -> database lookup of the
latents that fire -> per-token tables sorted by normalized activation.

The engine itself is not thread-safe; the server and the CLI hold a `ModelGate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from safesail.diagnose.bindings import BoundSAE, bind_saes
from safesail.diagnose.schemas import (DOMAINS, DiagnoseResponse, Filters, LatentHit, Timings, TokenInfo)
from safesail.diagnose.tokens import encode_prompt
from safesail.token_text import token_pieces
from safesail.errors import UserError
from safesail.hooks import capture_activations, special_token_mask

log = logging.getLogger(__name__)


@dataclass
class EngineSettings:
    max_new_tokens: int = 64
    max_new_tokens_limit: int = 256
    temperature: float = 0.0
    max_query_chars: int = 2000
    max_prompt_tokens: int = 512
    top: int = 30
    system_prompt: str | None = "You are a helpful assistant."
    threads: int | None = None   # torch CPU threads for the model (None: torch's default)

    @classmethod
    def from_cfg(cls, cfg) -> "EngineSettings":
        d = cfg.diagnose
        return cls(max_new_tokens=int(d.max_new_tokens), max_new_tokens_limit=int(d.max_new_tokens_limit),
                   temperature=float(d.temperature), max_query_chars=int(d.max_query_chars),
                   max_prompt_tokens=int(d.max_prompt_tokens), top=int(d.top),
                   system_prompt=cfg.model.get("system_prompt"),
                   threads=int(d.threads) if d.get("threads") else None)


@dataclass
class Annotated:
    """One diagnosed chat before it is cut down to a response."""

    query: str
    answer: str
    generated: bool
    truncated: bool
    ids: list[int]
    roles: list[str]
    special: torch.Tensor        # [T] bool
    norm: torch.Tensor           # [T, M] normalized activations of all database latents (0 on special tokens)
    raw: torch.Tensor            # [T, M] raw activations
    col_layer: torch.Tensor      # [M] layer of each column
    col_index: torch.Tensor      # [M] SAE latent index of each column
    col_hook: list[str]          # [n_saes] hook names; col_sae [M] points into it
    col_sae: torch.Tensor
    info: dict[int, dict]        # column -> database row, for every column firing somewhere
    timings: Timings = field(default_factory=Timings)


def _keep(info: dict, filters: Filters) -> bool:
    if filters.min_score is not None:
        score = info.get("score") if filters.score_kind == "simulation" else (info.get("scores") or {}).get(
            filters.score_kind)
        if score is None or score < filters.min_score:
            return False
    if filters.domains and not set(info.get("tags") or ()) & set(filters.domains):
        return False
    return True


def _interpreted(row: dict) -> bool:
    """A database row that says something (Safe-SAIL's indices also list latents its DB has no entry for)."""
    return row.get("explanation") is not None or row.get("score") is not None or bool(row.get("tags"))


def _safety_domain(tags) -> str | None:
    for t in tags or ():
        if t in DOMAINS:
            return t
    return None


def _ranked(shown: torch.Tensor, top: int) -> dict[int, list[tuple[int, float]]]:
    """Per token, the `top` positive columns by value (descending), ties broken by column (layer, index)."""
    t_idx, c_idx = shown.nonzero(as_tuple=True)
    if len(t_idx) == 0:
        return {}
    t_np, c_np = t_idx.numpy(), c_idx.numpy()
    v_np = shown[t_idx, c_idx].numpy()
    order = np.lexsort((c_np, -v_np, t_np))
    out: dict[int, list[tuple[int, float]]] = {}
    for t, c, v in zip(t_np[order].tolist(), c_np[order].tolist(), v_np[order].tolist()):
        lst = out.setdefault(t, [])
        if len(lst) < top:
            lst.append((c, v))
    return out


class DiagnoseEngine:
    def __init__(self, lm, db, saes: list[BoundSAE], settings: EngineSettings, db_path: str = ""):
        self.lm = lm
        self.db = db
        self.db_path = str(db_path)
        self.saes = saes
        self.settings = settings
        self.points = [b.hook for b in saes]
        self.col_layer = torch.cat([torch.full((len(b.latent_ids),), b.layer, dtype=torch.int64) for b in saes])
        self.col_index = torch.cat([b.latent_ids.cpu() for b in saes])
        self.col_sae = torch.cat([torch.full((len(b.latent_ids),), i, dtype=torch.int64) for i, b in enumerate(saes)])
        self.col_hook = [b.hook.name for b in saes]
        self._offsets = [0]
        for b in saes:
            self._offsets.append(self._offsets[-1] + len(b.latent_ids))

    # ---- construction ---------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "DiagnoseEngine":
        from safesail.models import load_model
        from safesail.neurondb import NeuronDB
        from safesail.rundir import RunDir

        db_path = Path(cfg.diagnose.db) if cfg.diagnose.get("db") else RunDir.from_cfg(cfg, create=False).neuron_db
        if not db_path.exists():
            raise UserError(f"there is no neuron database at {db_path}; build one with `safesail db build`, "
                            "import Safe-SAIL's with `safesail db import`, or point diagnose.db=... at one.")
        db = NeuronDB.open(db_path, readonly=True, check=True)  # integrity first, before the model loads
        lm = load_model(cfg.model, cfg.get("device", "auto"), cache_dir=cfg.get("cache_dir"))
        info = db.model_info() or {}
        if info.get("model") and info["model"] not in (lm.name, lm.path):
            log.warning("the neuron database was built for model %r, serving it with %r", info["model"], lm.name)
        saes = bind_saes(db, db_path, lm.device, lm.hidden_size, lm.num_layers)
        engine = cls(lm, db, saes, EngineSettings.from_cfg(cfg), db_path=str(db_path))
        engine.warm()
        return engine

    def warm(self) -> None:
        """Read each hook's rows once so the first query does not pay for filling the DB's lookup cache."""
        t0 = time.perf_counter()
        for b in self.saes:
            self.db.lookup(b.hook.name, b.latent_ids[:1].tolist())
        log.info("neuron DB lookups warmed in %.2f s", time.perf_counter() - t0)

    # ---- steps ------------------------------------------------------------------
    def check_query(self, query: str) -> None:
        if not query or not query.strip():
            raise UserError("the query is empty; type a question.")
        if len(query) > self.settings.max_query_chars:
            raise UserError(f"the query is {len(query)} characters long, over the limit of "
                            f"{self.settings.max_query_chars}; shorten it.")

    def _new_tokens(self, max_new_tokens: int | None) -> int:
        n = self.settings.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= n <= self.settings.max_new_tokens_limit:
            raise UserError(f"max_new_tokens={n} is outside 1..{self.settings.max_new_tokens_limit}; "
                            "ask for fewer tokens.")
        return n

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                 max_time: float | None = None, on_text=None) -> tuple[list[int], bool]:
        """Generate the answer's token ids (greedy when temperature is 0); also whether it was cut short."""
        tok = self.lm.tokenizer
        ids = torch.tensor([prompt_ids], device=self.lm.device)
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                  attention_mask=torch.ones_like(ids))
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if max_time is not None:
            kw["max_time"] = max(max_time, 0.01)
        if on_text is not None:
            from safesail.diagnose.streaming import CallbackStreamer

            kw["streamer"] = CallbackStreamer(tok, on_text)
        out = self.lm.model.generate(ids, **kw)[0, len(prompt_ids):].tolist()
        eos = self.lm.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id}
        if tok.pad_token_id is not None and tok.pad_token_id not in eos:
            while out and out[-1] == tok.pad_token_id:
                out.pop()
        ended = bool(out) and out[-1] in eos
        from safesail.token_text import drop_incomplete_tail

        out = drop_incomplete_tail(tok, out)  # cut inside a character: drop its first bytes (no U+FFFD)
        return out, not ended

    def _prompt(self, query: str) -> tuple[list[int], list[str]]:
        """The chat-templated query's ids and roles, within the prompt limit."""
        prompt_ids, roles = encode_prompt(self.lm.tokenizer, query, self.settings.system_prompt)
        if len(prompt_ids) > self.settings.max_prompt_tokens:
            raise UserError(f"the query takes {len(prompt_ids)} tokens with the chat template, over the limit of "
                            f"{self.settings.max_prompt_tokens}; shorten it.")
        return prompt_ids, roles

    def _answer_ids(self, answer: str) -> list[int]:
        """A given answer's ids, within the answer limits."""
        if len(answer) > self.settings.max_query_chars * 4:
            raise UserError(f"the answer is {len(answer)} characters long, over the limit of "
                            f"{self.settings.max_query_chars * 4}; shorten it.")
        answer_ids = self.lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(answer_ids) > self.settings.max_new_tokens_limit:
            raise UserError(f"the answer takes {len(answer_ids)} tokens, over the limit of "
                            f"{self.settings.max_new_tokens_limit}; shorten it.")
        return answer_ids

    def _set_threads(self) -> None:
        if self.settings.threads and torch.get_num_threads() != self.settings.threads:
            torch.set_num_threads(self.settings.threads)  # per calling thread: server workers differ

    @torch.no_grad()
    def annotate(self, query: str, answer: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, deadline: float | None = None, on_text=None) -> Annotated:
        """Generate (unless `answer` is given), re-run and encode: every database latent on every token."""
        self.check_query(query)
        self._set_threads()
        t_start = time.perf_counter()
        tok = self.lm.tokenizer
        prompt_ids, roles = self._prompt(query)
        timings = Timings()
        generated = answer is None
        truncated = False
        if generated:
            n = self._new_tokens(max_new_tokens)
            temp = self.settings.temperature if temperature is None else float(temperature)
            t0 = time.perf_counter()
            max_time = None if deadline is None else deadline - time.perf_counter()
            answer_ids, truncated = self.generate(prompt_ids, n, temp, max_time, on_text)
            timings.generate_s = time.perf_counter() - t0
            answer = tok.decode(answer_ids, skip_special_tokens=True)
        else:
            answer_ids = self._answer_ids(answer)
        ids = prompt_ids + answer_ids
        t0 = time.perf_counter()
        x = torch.tensor([ids], device=self.lm.device)
        acts = capture_activations(self.lm.model, x, None, self.points, stop_early=True)
        timings.forward_s = time.perf_counter() - t0
        a = self._encoded(query, answer, ids, roles + ["answer"] * len(answer_ids),
                          {h: v[0] for h, v in acts.items()}, timings)
        a.generated, a.truncated = generated, truncated
        a.timings.total_s = time.perf_counter() - t_start
        return a

    @torch.no_grad()
    def annotate_answers(self, query: str, answers: list[str], edits=None) -> list[Annotated]:
        """Several given answers to one query, annotated in ONE batched forward pass (right-padded).

        `edits(model, rows)`, when given, is a context-manager factory applied around that pass
        with `rows` = every batch row (e.g. `Intervention.apply` with a row mask, so that each
        answer is read under its own edit). Equal to `annotate(query, answer)` per answer up to
        floating-point batching effects (tested).
        """
        self.check_query(query)
        self._set_threads()
        t_start = time.perf_counter()
        prompt_ids, roles = self._prompt(query)
        seqs = [prompt_ids + self._answer_ids(ans) for ans in answers]
        width = max(len(q) for q in seqs)
        pad = self.lm.tokenizer.pad_token_id if self.lm.tokenizer.pad_token_id is not None else 0
        x = torch.tensor([q + [pad] * (width - len(q)) for q in seqs], device=self.lm.device)
        mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=self.lm.device)
        t0 = time.perf_counter()
        if edits is None:
            acts = capture_activations(self.lm.model, x, mask, self.points, stop_early=True)
        else:
            with edits(self.lm.model, len(seqs)):
                acts = capture_activations(self.lm.model, x, mask, self.points, stop_early=True)
        forward_s = (time.perf_counter() - t0) / len(seqs)
        out = []
        for r, (ans, ids) in enumerate(zip(answers, seqs)):
            timings = Timings()
            timings.forward_s = forward_s
            a = self._encoded(query, ans, ids, roles + ["answer"] * (len(ids) - len(prompt_ids)),
                              {h: v[r, :len(ids)] for h, v in acts.items()}, timings)
            a.generated = False
            a.timings.total_s = time.perf_counter() - t_start
            out.append(a)
        return out

    def _encoded(self, query: str, answer: str, ids: list[int], roles: list[str], acts: dict[str, torch.Tensor],
                 timings: Timings) -> Annotated:
        """SAE codes of one chat's [T, d] activations per hook, normalized, with the DB rows of firing latents."""
        t0 = time.perf_counter()
        special = special_token_mask(self.lm.tokenizer, torch.tensor([ids]))[0].cpu()
        raws, norms = [], []
        for b in self.saes:
            r, nrm = b.normalized(acts[b.hook.name])
            raws.append(r.cpu())
            norms.append(nrm.cpu())
        raw = torch.cat(raws, 1)
        norm = torch.cat(norms, 1)
        raw[special] = 0
        norm[special] = 0
        norm.clamp_(min=0)
        timings.encode_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        firing = (norm > 0).any(0).nonzero().flatten()
        info: dict[int, dict] = {}
        for s, b in enumerate(self.saes):
            lo, hi = self._offsets[s], self._offsets[s + 1]
            cols = firing[(firing >= lo) & (firing < hi)]
            if len(cols) == 0:
                continue
            idx = self.col_index[cols].tolist()
            rows = self.db.lookup(b.hook.name, idx)
            for c, i in zip(cols.tolist(), idx):
                row = rows.get(i)
                if row is not None and _interpreted(row):
                    info[c] = row
        timings.lookup_s = time.perf_counter() - t0
        return Annotated(query=query, answer=answer, generated=False, truncated=False, ids=ids,
                         roles=roles, special=special, norm=norm, raw=raw, col_layer=self.col_layer,
                         col_index=self.col_index, col_hook=self.col_hook, col_sae=self.col_sae, info=info,
                         timings=timings)

    def response(self, a: Annotated, top: int | None = None, filters: Filters | None = None,
                 include_template: bool = False) -> DiagnoseResponse:
        """Cut an annotated chat down to the API's per-token tables."""
        t0 = time.perf_counter()
        filters = filters or Filters()
        top = self.settings.top if top is None else int(top)
        M = a.norm.shape[1]
        known = torch.zeros(M, dtype=torch.bool)
        keep = torch.zeros(M, dtype=torch.bool)
        tagged = torch.zeros(M, dtype=torch.bool)
        for c, row in a.info.items():
            known[c] = True
            keep[c] = _keep(row, filters)
            tagged[c] = _safety_domain(row.get("tags")) is not None
        n_active = ((a.norm > 0) & known).sum(1).tolist()
        safety = torch.where(tagged, a.norm, torch.zeros(()))
        max_norm, max_col = safety.max(1) if M else (torch.zeros(len(a.ids)), torch.zeros(len(a.ids), dtype=torch.long))
        shown = torch.where(keep & (a.norm > filters.min_norm), a.norm, torch.zeros(()))
        per_token = _ranked(shown, top)
        pieces = token_pieces(self.lm.tokenizer, a.ids)
        tokens = []
        for t, tid in enumerate(a.ids):
            hits = []
            listed = include_template or a.roles[t] in ("query", "answer")
            for c, v in (per_token.get(t, ()) if listed else ()):
                row = a.info[c]
                layer, index = int(a.col_layer[c]), int(a.col_index[c])
                hits.append(LatentHit(neuron_id=f"{layer}_{index}", hook=a.col_hook[int(a.col_sae[c])], layer=layer,
                                      index=index, activation=float(a.raw[t, c]), norm_activation=v,
                                      explanation=row.get("explanation"), score=row.get("score"),
                                      scores=dict(row.get("scores") or {}), tags=list(row.get("tags") or [])))
            mn = float(max_norm[t])
            tokens.append(TokenInfo(position=t, token_id=int(tid), text=pieces[t], role=a.roles[t],
                                    special=bool(a.special[t]), max_norm=mn,
                                    max_domain=_safety_domain(a.info[int(max_col[t])].get("tags")) if mn > 0 else None,
                                    n_active=int(n_active[t]), latents=hits))
        timings = a.timings.model_copy()
        timings.respond_s = time.perf_counter() - t0
        timings.total_s += timings.respond_s
        return DiagnoseResponse(query=a.query, answer=a.answer, generated=a.generated, truncated=a.truncated,
                                tokens=tokens, timings=timings)

    def diagnose(self, query: str, answer: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, top: int | None = None, filters: Filters | None = None,
                 include_template: bool = False, deadline: float | None = None, on_text=None) -> DiagnoseResponse:
        """`on_text(piece)` receives the answer's text as it is generated (streaming)."""
        return self.response(self.annotate(query, answer, max_new_tokens, temperature, deadline, on_text), top,
                             filters, include_template)
