"""The `explain` stage: an LLM describes what each latent detects.

For every latent collect wrote, the explain-split activating segments are shown
to the LLM (`prompts/explain.py`), the reply is parsed to one short line and a
record is appended to `interpret/explanations.jsonl` (format:
docs/latents-format.md). Failures (server down, timeout, 429, 5xx, empty or
malformed reply, wrong language, prompt too long even after trimming) are
recorded per latent with their reason; the run goes on and the summary counts
them. A re-run skips latents already explained with the same model and prompt
version, and the response cache means a killed run repeats no LLM call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from safesail.errors import UserError
from safesail.interpret.clients.base import ChatRequest, LLMClient, LLMError
from safesail.interpret.prompts.explain import (EXAMPLES, N_SHOWN, PROMPT_VERSION, ExplanationError,
                                                build_explain_messages, copied_reason, generic_reason,
                                                parse_explanation)
from safesail.rundir import RunDir, fingerprint
from safesail.interpret import records
from safesail.interpret.records import ExplanationRecord, RecordWriter

log = logging.getLogger(__name__)


# Failures a retry would repeat (the prompt cannot be made, or a copy was already asked again): a re-run skips them.
PERMANENT = {"too_few_examples", "context_overflow", "copied_example", "generic_reply"}
# Replies asked once more with other worked examples (explain.copy_retries): a copy, or no concept named.
RETRIED = {"copied_example", "generic_reply"}
# The model answered, but nothing usable: a re-run asks once more (past the response cache), then skips them.
# Transport failures (clients.base.TRANSPORT_FAILURES: truncated or empty replies, 5xx, timeouts, ...) and
# the rest (bad_request, auth, other) are asked again by every re-run.
MODEL_FAILURES = {"wrong_language", "malformed_reply"}
MODEL_RETRIES = 1


@dataclass
class LatentTask:
    hook: str
    layer: int
    latent: int
    max_act: float
    segments: list[dict]          # explain-split activating segments, highest peak first
    too_few: str | None = None    # collect's reason, when it listed the latent as too_few
    attempt: int = 0              # 1, 2, ...: asked again by a re-run after a model-level failure


# ---- reading collect's output ----------------------------------------------------------------------

def collected_hooks(rd: RunDir) -> list[str]:
    root = rd.root / "latents"
    hooks = []
    for meta_path in sorted(root.glob("*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            continue
        if meta.get("complete"):
            hooks.append(meta["hook"])
    return hooks


def load_tasks(rd: RunDir, hook: str, latents: list[int] | None = None) -> list[LatentTask]:
    latent_stats = records.read_latent_stats(rd.latents(hook), hook)
    meta, stats = latent_stats.meta, latent_stats.tensors
    ids = stats["latent_ids"].tolist()
    max_act = dict(zip(ids, stats["max_act"].tolist()))
    segs: dict[int, list[dict]] = {}
    with open(rd.latent_segments(hook), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r["split"] == "explain" and r["kind"] == "activating":
                segs.setdefault(r["latent"], []).append(r)
    too_few = {t["latent"]: t["reason"] for t in meta.get("too_few", [])}
    wanted = ids if latents is None else [j for j in ids if j in set(latents)]
    if latents is not None and len(wanted) < len(set(latents)):
        missing = sorted(set(latents) - set(ids))
        raise UserError(f"latent {missing[0]} was not collected at {hook}; run `safesail collect` with it in "
                        "collect.latents or fix explain.latents.")
    tasks = []
    for j in wanted:
        ss = sorted(segs.get(j, []), key=lambda r: -max(r["acts"] or [0]))
        tasks.append(LatentTask(hook, int(meta["layer"]), int(j), float(max_act[j]), ss, too_few.get(j)))
    return tasks


RANKS = ("select", "mcnemar")


def strongest_candidates(rd: RunDir, hooks: list[str], per_domain: int, rank: str = "select") -> dict[str, list[int]]:
    """Per hook, the latents to explain: for each domain, the `per_domain` best candidates of select over
    all hooks. rank="select": by the ranking value select recorded for each candidate (`score`: the
    swapped-word score under select.candidate_rank=word, docs/selection.md), ties by the larger
    distinguishing frequency. rank="mcnemar": the smallest exact McNemar p-value of concept-only vs
    twin-only firing (`pair_evidence.py`), ties by the larger distinguishing frequency."""
    from safesail.interpret.pair_evidence import mcnemar_p
    from safesail.train.selection import load_pair_stats, load_selection, pair_stats_path

    if rank not in RANKS:
        raise UserError(f"explain.rank={rank!r} is unknown; use {' or '.join(RANKS)}.")
    sel = load_selection(rd.root)
    cands = sel.get("candidates", {})
    n_pairs = sel.get("pairs", {}).get("by_domain") or {}
    by_domain: dict[str, list[tuple]] = {}
    for hook in hooks:
        stats = None
        if rank == "mcnemar" and pair_stats_path(rd.root, hook).is_file():
            stats = load_pair_stats(rd.root, hook)
        for group, lst in (cands.get(hook) or {}).items():
            if group == "all":
                continue
            for c in lst:
                j = int(c["latent"])
                if rank == "select":
                    key = -float(c.get("score", c["freq"]))
                else:
                    key = 1.0
                    if stats is not None and n_pairs.get(group) and f"{group}.distinguish_rate" in stats:
                        n = int(n_pairs[group])
                        key = mcnemar_p(int(round(float(stats[f"{group}.distinguish_rate"][j]) * n)),
                                        int(round(float(stats[f"{group}.reverse_rate"][j]) * n)))
                by_domain.setdefault(group, []).append((key, -float(c["freq"]), hook, j))
    out: dict[str, set[int]] = {}
    for group in sorted(by_domain):
        for _, _, hook, latent in sorted(by_domain[group])[:per_domain]:
            out.setdefault(hook, set()).add(latent)
    return {h: sorted(v) for h, v in out.items()}


# ---- the explanations file -----------------------------------------------------------------------

def explanations_path(rd: RunDir) -> Path:
    return rd.explanations_file


def read_explanations(path: Path) -> dict[tuple[str, int], ExplanationRecord]:
    """The last record per (hook, latent); a torn last line (killed writer) is skipped."""
    return records.read_explanations(path)


# ---- one latent ----------------------------------------------------------------------------------------

def fit_prompt(client: LLMClient, task: LatentTask, max_segments: int, reply_tokens: int,
               rotation: int = 0, style: str = "v3") -> tuple[list[dict], int]:
    """Messages that fit the context window: fewer segments first, then shorter ones around their peak;
    in a small window (a tiny test model) fewer worked examples before giving up."""
    budget = client.context_window - reply_tokens
    segs = task.segments[:max_segments]
    n = len(segs)
    shown = N_SHOWN
    while shown > 0 and client.count_message_tokens(
            build_explain_messages([around_peak(s, 8) for s in segs[:1]], task.max_act, rotation, shown,
                                   style)) > budget:
        shown -= 1

    def build(ss):
        return build_explain_messages(ss, task.max_act, rotation, shown, style)

    while n > 1 and client.count_message_tokens(build(segs[:n])) > budget:
        n -= 1
    segs = segs[:n]
    msgs = build(segs)
    width = max((len(s["tokens"]) for s in segs), default=0)
    while client.count_message_tokens(msgs) > budget and width > 1:
        width //= 2
        segs = [around_peak(s, width) for s in segs]
        msgs = build(segs)
    if client.count_message_tokens(msgs) > budget:
        raise LLMError("context_overflow", f"even one segment does not fit the context window of "
                                           f"{client.context_window} tokens")
    return msgs, n


def around_peak(seg: dict, width: int) -> dict:
    acts = seg["acts"]
    peak = max(range(len(acts)), key=lambda i: acts[i]) if acts else 0
    a = max(0, min(peak - width // 2, len(acts) - width))
    return {**seg, "tokens": seg["tokens"][a:a + width], "acts": acts[a:a + width]}


def rotation_of(task: LatentTask) -> int:
    """Which worked examples a latent's prompt starts at: spread over latents, stable across re-runs."""
    return (task.latent * 7 + task.layer) % len(EXAMPLES)


async def _ask(client: LLMClient, task: LatentTask, ecfg: DictConfig, rotation: int, rec: dict) -> str:
    """One explanation call; the parsed reply (ExplanationError/LLMError on failure). Fills `rec`'s counters."""
    reply_tokens = int(ecfg.get("max_tokens", 48))
    msgs, n = fit_prompt(client, task, int(ecfg.get("max_segments", 10)), reply_tokens, rotation)
    rec["segments"] = n
    comp = await client.chat(ChatRequest(messages=msgs, max_tokens=reply_tokens,
                                         temperature=float(ecfg.get("temperature", 0.0)),
                                         stop=list(ecfg.get("stop") or []) or None, attempt=task.attempt))
    rec.update(raw=comp.text, prompt_tokens=rec["prompt_tokens"] + comp.prompt_tokens, cached=comp.cached,
               model=client.model_name or comp.model, llm_calls=rec["llm_calls"] + 1, rotation=rotation)
    text = parse_explanation(comp.text, int(ecfg.get("max_chars", 200)), ecfg.get("language"))
    excerpts = ["".join(s["tokens"]) for s in task.segments[:n]]
    why = copied_reason(text, excerpts)
    if why:
        rec["copied"] = rec["copied"] + [{"reply": text, "why": why, "rotation": rotation}]
        raise ExplanationError("copied_example", why)
    why = generic_reason(text)
    if why:
        rec["copied"] = rec["copied"] + [{"reply": text, "why": why, "rotation": rotation}]
        raise ExplanationError("generic_reply", why)
    return text


async def explain_latent(client: LLMClient, task: LatentTask, ecfg: DictConfig) -> dict:
    """One latent's record. A reply that copies a worked example or echoes an excerpt is retried once with
    other examples in another order; a second copy is the named failure `copied_example`."""
    t0 = time.monotonic()
    rec = {"hook": task.hook, "layer": task.layer, "latent": task.latent, "status": "failed", "explanation": None,
           "error": None, "reason": None, "model": client.model_name, "prompt_version": PROMPT_VERSION,
           "raw": None, "prompt_tokens": 0, "segments": 0, "cached": False, "llm_calls": 0, "copied": [],
           "attempt": task.attempt}
    try:
        if not task.segments:
            raise ExplanationError("too_few_examples", task.too_few or "no activating segment in the explain split")
        rotation = rotation_of(task)
        try:
            rec["explanation"] = await _ask(client, task, ecfg, rotation, rec)
        except ExplanationError as e:
            if e.reason not in RETRIED or not int(ecfg.get("copy_retries", 1)):
                raise
            rec["explanation"] = await _ask(client, task, ecfg, rotation + len(EXAMPLES) // 2 + 1, rec)
        rec["status"] = "ok"
    except (LLMError, ExplanationError) as e:
        rec["reason"], rec["error"] = e.reason, str(e)[:500]
    except Exception as e:  # noqa: BLE001 - one latent's bug must not stop the run
        log.exception("explaining latent %d at %s failed", task.latent, task.hook)
        rec["reason"], rec["error"] = "other", f"{type(e).__name__}: {e}"[:500]
    rec["elapsed_s"] = round(time.monotonic() - t0, 3)
    rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return rec


async def explain_all(client: LLMClient, tasks: list[LatentTask], ecfg: DictConfig, out: RecordWriter) -> Counter:
    """Explain every task with at most explain.concurrency in flight; returns counts by outcome."""
    sem = asyncio.Semaphore(max(1, int(ecfg.get("concurrency", 4))))
    counts: Counter = Counter()
    limit = int(ecfg.get("max_unreachable", 3))
    down = {"streak": 0}

    async def one(task: LatentTask) -> dict:
        async with sem:
            if limit and down["streak"] >= limit:
                # The server failed this many latents in a row even after retries: record, do not wait.
                rec = await explain_latent(client, LatentTask(task.hook, task.layer, task.latent, task.max_act, []),
                                           ecfg)
                rec["reason"] = "connection"
                rec["error"] = f"connection: not tried, the LLM server was unreachable for {limit} latents in a row"
                return rec
            rec = await explain_latent(client, task, ecfg)
            down["streak"] = down["streak"] + 1 if rec["reason"] in ("connection", "timeout") else 0
            return rec

    futures = [asyncio.ensure_future(one(t)) for t in tasks]
    try:
        for fut in tqdm(asyncio.as_completed(futures), total=len(futures), desc="explain", unit="latent"):
            rec = await fut
            out.write(rec)
            counts["ok" if rec["status"] == "ok" else f"failed:{rec['reason']}"] += 1
    finally:
        for f in futures:
            f.cancel()
    return counts


# ---- the stage -----------------------------------------------------------------------------------------

def run_explain_stage(cfg: DictConfig, args: list[str], client: LLMClient | None = None) -> None:
    """`safesail explain`; `client` replaces the one built from cfg.llm (tests, notebooks)."""
    from safesail.interpret.clients import make_client

    if args:
        raise UserError(f"`safesail explain` takes no arguments (got {' '.join(args)}); pass settings as "
                        "explain.key=value.")
    rd = RunDir.from_cfg(cfg)
    ecfg = cfg.explain
    hooks = collected_hooks(rd)
    if not hooks:
        raise UserError(f"{rd.root / 'latents'} holds no collected latents; run `safesail collect` first.")
    if ecfg.get("hooks"):
        unknown = [h for h in ecfg.hooks if h not in hooks]
        if unknown:
            raise UserError(f"collect has no latents for the hook {unknown[0]}; choose among {', '.join(hooks)} "
                            "in explain.hooks.")
        hooks = [str(h) for h in ecfg.hooks]
    spec = ecfg.get("latents", "all")
    latents = None if spec in (None, "all") else [int(x) for x in spec]
    collect_fps = {h: json.loads(rd.latent_meta(h).read_text()).get("fingerprint") for h in hooks}
    fp = fingerprint({"prompt": PROMPT_VERSION, "llm": OmegaConf.to_container(cfg.llm, resolve=True),
                      "explain": OmegaConf.to_container(ecfg, resolve=True), "collect": collect_fps})
    if rd.stage_done("explain", fp):
        log.info("explain: already done for these settings (%s); nothing to do", explanations_path(rd))
        return
    top = ecfg.get("top_per_domain")
    if top is not None and latents is None:
        rank = str(ecfg.get("rank") or "select")
        chosen = strongest_candidates(rd, collected_hooks(rd), int(top), rank)   # over every hook, then explain.hooks
        tasks = [t for h in hooks if h in chosen for t in load_tasks(rd, h, chosen[h])]
        log.info("explain: the %d best candidates (%d per domain, rank=%s)", len(tasks), int(top), rank)
    else:
        tasks = [t for h in hooks for t in load_tasks(rd, h, latents)]
    if client is None:
        client = make_client(cfg.llm, rd.llm_cache_file, cache_dir=cfg.get("cache_dir"),
                             device=cfg.get("device", "auto"))
    summary = asyncio.run(_explain_run(client, tasks, ecfg, explanations_path(rd)))
    failed = {k: v for k, v in summary.items() if k.startswith("failed:") and k[7:] not in PERMANENT}
    after = read_explanations(explanations_path(rd))
    status = "partial" if any(not _already(after.get((t.hook, t.latent)), t, client.model_name) for t in tasks) \
        else "done"
    rd.mark_stage("explain", fp, status=status, **summary)
    msg = ", ".join(f"{k} {v}" for k, v in sorted(summary.items())) or "nothing to do"
    log.info("explain: %s (%s)", msg, explanations_path(rd))
    if failed:
        log.warning("explain: %d latents failed (%s); run `safesail explain` again to retry them",
                    sum(failed.values()), ", ".join(f"{k[7:]} {v}" for k, v in failed.items()))


async def _explain_run(client: LLMClient, tasks: list[LatentTask], ecfg: DictConfig, path: Path) -> dict:
    try:
        try:
            await client.ensure_ready()
        except LLMError as e:
            log.warning("the LLM is not reachable (%s); every latent will be recorded as failed", e)
        existing = read_explanations(path)
        todo = [t for t in tasks if not _already(existing.get((t.hook, t.latent)), t, client.model_name)]
        for t in todo:
            old = existing.get((t.hook, t.latent)) or {}
            if old.get("reason") in MODEL_FAILURES:
                t.attempt = int(old.get("attempt") or 0) + 1
        skipped = len(tasks) - len(todo)
        if skipped:
            log.info("explain: %d latents already explained with %s / %s; %d to go", skipped, client.model_name,
                     PROMPT_VERSION, len(todo))
        out = records.explanation_writer(path)
        try:
            counts = await explain_all(client, todo, ecfg, out)
        finally:
            out.close()
        counts["skipped"] = skipped
        return dict(counts)
    finally:
        await client.aclose()


def _already(rec: dict | None, task: LatentTask, model: str) -> bool:
    """Explained with this model and prompt, or failed in a way a retry would repeat (or was retried for)."""
    if not rec or rec.get("prompt_version") != PROMPT_VERSION:
        return False
    if rec.get("reason") == "too_few_examples":
        return not task.segments
    if rec.get("model") != model:
        return False
    if rec.get("reason") in MODEL_FAILURES:
        return int(rec.get("attempt") or 0) >= MODEL_RETRIES
    return rec.get("status") == "ok" or rec.get("reason") in PERMANENT
