"""`safesail tag`: safety-domain tags per latent (writes interpret/tags.jsonl).

Two sources of evidence, both stored with every record:
* ``llm``: the tagger LLM (the `llm` group) reads the latent's explanation and its top
  excerpts (peak tokens bracketed) and names zero or more of politics, pornography,
  violence, terror (`prompts/tag.py`);
* ``pairs``: the select stage's contrastive pair statistics: per domain an exact McNemar
  test of concept-only vs twin-only firing, the rate difference as effect size, and
  whether it passes (`pair_evidence.py`).
The rule that combines them is `tag.rule` (either | both | pairs_only | llm_only); the
default is the one `benchmarks/bench_tag_rule.py` measured best on held-out pairs
(precision and recall per domain, `tag_rule.py`; figures in BENCHMARKS.md).
A latent without pair statistics (no select stage, or a latent the select stage did
not measure) has LLM evidence only: "either" and "both" then use the LLM's domains
and the record says so (`basis`). Format: docs/scoring.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safesail.errors import UserError
from safesail.interpret.clients.base import ChatRequest, LLMClient, LLMError
from safesail.interpret import pair_evidence as pe
from safesail.interpret.prompts import tag as prompts
from safesail.interpret.scoring.inputs import explanation_key, load_explanations
from safesail.interpret import records
from safesail.rundir import RunDir, fingerprint

log = logging.getLogger(__name__)

RULES = ("either", "both", "pairs_only", "llm_only")
DOMAINS = prompts.DOMAINS


def tag_settings(cfg: DictConfig) -> dict:
    t = OmegaConf.to_container(cfg.get("tag") or {}, resolve=True) or {}
    s = {"rule": str(t.get("rule", "pairs_only")),
         "alpha": float(t.get("alpha", pe.DEFAULTS["alpha"])),
         "min_concept_rate": float(t.get("min_concept_rate", pe.DEFAULTS["min_concept_rate"])),
         "min_rate_diff": float(t.get("min_rate_diff", pe.DEFAULTS["min_rate_diff"])),
         "min_act_diff": float(t.get("min_act_diff", pe.DEFAULTS["min_act_diff"])),
         "use_llm": bool(t.get("use_llm", True)),
         "segments": int(t.get("segments", 3)),
         "segment_tokens": int(t.get("segment_tokens", 24)),
         "max_tokens": int(t.get("max_tokens", 16)),
         "concurrency": int(t.get("concurrency") or cfg.llm.get("concurrency", 4))}
    if s["rule"] not in RULES:
        raise UserError(f"unknown tag.rule {s['rule']!r}; use one of {', '.join(RULES)}.")
    if not 0 < s["alpha"] <= 1:
        raise UserError(f"tag.alpha must be in (0, 1], got {s['alpha']}; 0.01 is the default.")
    return s


def thresholds(s: dict) -> dict:
    return {k: s[k] for k in ("rule", "alpha", "min_concept_rate", "min_rate_diff", "min_act_diff", "segments",
                              "segment_tokens")}


# ---- pair evidence ---------------------------------------------------------------------

def pair_index(stats: dict) -> dict[int, int]:
    """latent id -> row in the pair-stat tensors."""
    return {int(j): i for i, j in enumerate(stats["latent_ids"].tolist())}


def pair_evidence(stats: dict, row: int, s: dict, n_pairs: dict[str, int]) -> dict:
    """Per domain: rates on concept vs neutral queries, McNemar p, effect size, and whether it passes."""
    return pe.latent_evidence(stats, row, n_pairs, DOMAINS, s)


def load_hook_pairs(rd: RunDir, hook: str) -> dict | None:
    from safesail.train.selection import load_pair_stats, pair_stats_path

    if not pair_stats_path(rd.root, hook).is_file():
        return None
    return load_pair_stats(rd.root, hook)


def pairs_per_domain(rd: RunDir) -> dict[str, int]:
    """How many pairs of each domain select measured (selection.json); {} without a selection."""
    from safesail.train.selection import load_selection, selection_path

    if not selection_path(rd.root).is_file():
        return {}
    return {str(d): int(n) for d, n in (load_selection(rd.root).get("pairs", {}).get("by_domain") or {}).items()}


def load_excerpts(rd: RunDir, hook: str, s: dict) -> dict[int, list[str]]:
    """Per latent, its top explain-split excerpts (peak tokens bracketed); {} when collect wrote none."""
    from safesail.interpret.explain import around_peak, load_tasks

    if s["segments"] <= 0 or not (rd.latent_segments(hook)).is_file():
        return {}
    out = {}
    for t in load_tasks(rd, hook):
        segs = [around_peak(x, s["segment_tokens"]) for x in t.segments[:s["segments"]]]
        out[t.latent] = prompts.excerpt_texts(segs, t.max_act)
    return out


# ---- LLM evidence -------------------------------------------------------------------------

def fit_tag_prompt(client: LLMClient, explanation: str, excerpts: list[str], max_tokens: int) -> list[dict]:
    """The tag messages, with fewer excerpts and then fewer worked examples until they fit the window."""
    budget = client.context_window - max_tokens
    n_ex = prompts.N_EXAMPLES
    msgs = prompts.tag_messages(explanation, excerpts, n_ex)
    while client.count_message_tokens(msgs) > budget and (excerpts or n_ex):
        if excerpts:
            excerpts = excerpts[:-1]
        else:
            n_ex -= 1
        msgs = prompts.tag_messages(explanation, excerpts, n_ex)
    return msgs


async def llm_evidence(client: LLMClient, explanation: str, excerpts: list[str] | None = None,
                       max_tokens: int = 16) -> dict:
    """{"domains", "raw", "status"}: status ok | unparsable | llm_error | no_explanation."""
    if not explanation.strip():
        return {"domains": [], "raw": None, "status": "no_explanation"}
    req = ChatRequest(messages=fit_tag_prompt(client, explanation, list(excerpts or []), max_tokens),
                      max_tokens=max_tokens, temperature=0.0, stop=["\n"])
    try:
        comp = await client.chat(req)
    except LLMError as e:
        return {"domains": [], "raw": None, "status": "llm_error", "error": f"{e.reason} {e.message}".strip()}
    try:
        return {"domains": prompts.parse_domains(comp.text), "raw": comp.text[:2000], "status": "ok"}
    except prompts.TagParseError as e:
        return {"domains": [], "raw": comp.text[:2000], "status": "unparsable", "error": str(e)}


# ---- the rule -----------------------------------------------------------------------------

def combine(llm: dict | None, pairs: dict | None, rule: str) -> tuple[list[str], str]:
    """(tags, basis). `llm` is the LLM evidence (None when not asked), `pairs` the pair evidence."""
    llm_set = set(llm["domains"]) if llm and llm.get("status") == "ok" else set()
    pair_set = {d for d, e in (pairs or {}).items() if e["passes"]}
    if rule == "llm_only":
        chosen, basis = llm_set, "llm"
    elif rule == "pairs_only":
        chosen, basis = pair_set, "pairs" if pairs else "pairs (none for this latent)"
    elif not pairs:
        chosen, basis = llm_set, "llm only: no pair statistics for this latent"
    elif rule == "either":
        chosen, basis = llm_set | pair_set, "llm or pairs"
    else:  # both
        chosen, basis = llm_set & pair_set, "llm and pairs"
    return [d for d in DOMAINS if d in chosen], basis


def tag_record(hook: str, layer, latent: int, expl: dict, llm: dict | None, pairs: dict | None, s: dict,
               tagger: str | None) -> dict:
    tags, basis = combine(llm, pairs, s["rule"])
    return {"hook": hook, "layer": layer, "latent": int(latent), "tags": tags, "basis": basis,
            "evidence": {"llm": llm, "pairs": pairs}, "thresholds": thresholds(s),
            "tagger": tagger, "prompt_version": prompts.PROMPT_VERSION, "explanation_key": explanation_key(expl),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _is_current(rec: dict, expl: dict, s: dict, tagger: str | None) -> bool:
    llm = (rec.get("evidence") or {}).get("llm") or {}
    return (rec.get("explanation_key") == explanation_key(expl) and rec.get("thresholds") == thresholds(s)
            and rec.get("tagger") == tagger and rec.get("prompt_version") == prompts.PROMPT_VERSION
            and llm.get("status") != "llm_error")


# ---- the stage ----------------------------------------------------------------------------

def run_tag_stage(cfg: DictConfig, args: list[str]) -> None:
    if args:
        raise UserError(f"`safesail tag` takes no arguments, got {' '.join(args)!r}; pass settings as tag.key=value.")
    s = tag_settings(cfg)
    rd = RunDir.from_cfg(cfg)
    expls = load_explanations(rd)
    keys = sorted(expls)
    use_llm = s["use_llm"]   # asked even under pairs_only: the LLM evidence is recorded and measured
    fp = fingerprint({"tag": {k: v for k, v in s.items() if k != "concurrency"},
                      "llm": OmegaConf.to_container(cfg.llm, resolve=True) if use_llm else None,
                      "explanations": [[h, l, explanation_key(expls[(h, l)])] for h, l in keys],
                      "pairs": {h: _mtime(rd, h) for h in sorted({h for h, _ in keys})}})
    if rd.stage_done("tag", fp):
        log.info("tag: already done for these explanations and settings; nothing to do")
        return
    client = None
    if use_llm:
        from safesail.interpret.clients import make_client

        client = make_client(cfg.llm, rd.llm_cache_file, cache_dir=cfg.get("cache_dir"),
                             device=str(cfg.get("device", "auto")))
    summary = asyncio.run(tag_all(rd, s, client, expls, keys))
    rd.mark_stage("tag", fp, **summary)


def _mtime(rd: RunDir, hook: str) -> float | None:
    from safesail.train.selection import pair_stats_path

    p = pair_stats_path(rd.root, hook)
    return p.stat().st_mtime if p.is_file() else None


async def tag_all(rd: RunDir, s: dict, client: LLMClient | None, expls: dict, keys: list) -> dict:
    """Tag every (hook, latent) in `keys`, appending to interpret/tags.jsonl; returns a summary."""
    tagger = client.model_name if client is not None else None
    out_path = rd.tags_file
    stored = records.read_tags(out_path)
    todo = [k for k in keys if not (k in stored and _is_current(stored[k], expls[k], s, tagger))]
    pairs_by_hook = {h: load_hook_pairs(rd, h) for h in sorted({h for h, _ in keys})}
    index = {h: pair_index(p) if p is not None else {} for h, p in pairs_by_hook.items()}
    n_pairs = pairs_per_domain(rd)
    excerpts = {h: load_excerpts(rd, h, s) for h in pairs_by_hook} if client is not None else {}
    for h, p in pairs_by_hook.items():
        if p is None:
            log.warning("tag: no pair statistics for %s (run `safesail select`); its tags use LLM evidence only", h)
    log.info("tag: %d latents, %d already tagged, %d to do (rule %s)", len(keys), len(keys) - len(todo), len(todo),
             s["rule"])
    sem = asyncio.Semaphore(max(1, s["concurrency"]))
    rd.interpret.mkdir(parents=True, exist_ok=True)
    try:
        with records.tag_writer(out_path) as out, tqdm(total=len(todo), desc="tag", unit="latent") as bar:
            async def one(key):
                hook, latent = key
                expl = expls[key]
                text = str(expl.get("explanation") or "") if expl.get("status") == "ok" else ""
                llm = None
                if client is not None:
                    async with sem:
                        llm = await llm_evidence(client, text, excerpts[hook].get(int(latent)), s["max_tokens"])
                row = index[hook].get(int(latent))
                pairs = pair_evidence(pairs_by_hook[hook], row, s, n_pairs) if row is not None and n_pairs else None
                out.write(tag_record(hook, expl.get("layer"), latent, expl, llm, pairs, s, tagger))
                bar.update(1)

            await asyncio.gather(*(one(k) for k in todo))
    finally:
        if client is not None:
            await client.aclose()
    final = records.read_tags(out_path)
    recs = [final[k] for k in keys if k in final]
    per_domain = Counter(d for r in recs for d in r["tags"])
    llm_status = Counter(((r["evidence"].get("llm") or {}).get("status") or "not_asked") for r in recs)
    summary = {"latents": len(recs), "tagged": sum(1 for r in recs if r["tags"]), "per_domain": dict(per_domain),
               "llm_status": dict(llm_status),
               "with_pairs": sum(1 for r in recs if r["evidence"].get("pairs") is not None)}
    log.info("tag: %s", summary)
    return summary
