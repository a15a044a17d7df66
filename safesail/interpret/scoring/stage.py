"""`safesail score`: every explained latent scored by each scorer in `score.scorers`, with controls.

For each explained latent and each scorer (registry: simulation, detection, fuzzing) the
scorer runs on the latent's held-out score segments three times: with the latent's own
explanation, with another latent's (`controls.shuffled_partners`) and with a constant,
content-free one; a bootstrap over the scored items gives the interval. One
`records.ScoreRecord` per (hook, latent, kind) is appended to interpret/scores.jsonl as
soon as it is done; LLM replies live in the response cache interpret/llm_cache.sqlite. A
killed run continues where it stopped, a re-run repeats no call, and a record with items
that failed with a retryable error (`protocol.item_status`) is redone: every such item is
sent again. Format: docs/scoring.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safesail.config_types import LLMConfig, ScoreConfig, load_group
from safesail.errors import UserError
from safesail.interpret.scoring import controls as ctl
from safesail.interpret.scoring.inputs import explanation_key, load_explanations, load_score_segments
from safesail.interpret.scoring.metrics import bootstrap_interval
from safesail.interpret.scoring.protocol import Example, ScorerRun
from safesail.interpret.scoring.records import ScoreRecord, ScoreWriter, read_scores
from safesail.interpret.scoring.registry import check_names, make_scorers
from safesail.interpret.scoring.simulation import GRANULARITIES
from safesail.interpret.scoring.summary import summarize
from safesail.rundir import RunDir, fingerprint

log = logging.getLogger(__name__)

_COMPACT = ("segment_id", "id", "pred", "p_yes", "status", "failure")


def score_settings(cfg: DictConfig) -> dict:
    """The typed `score` group (config_types.ScoreConfig; defaults only in configs/score/default.yaml)
    as a dict, checked (one sentence per bad setting); `concurrency: null` takes llm.concurrency."""
    out = dataclasses.asdict(load_group(cfg.get("score"), ScoreConfig, "score"))
    out["scorers"] = check_names(out["scorers"])
    if out["concurrency"] is None:
        out["concurrency"] = load_group(cfg.get("llm"), LLMConfig, "llm").concurrency
    bad = [c for c in out["controls"] if c not in ctl.CONTROLS]
    if bad:
        raise UserError(f"unknown score.controls {bad!r}; use a subset of {list(ctl.CONTROLS)}.")
    if out["granularity"] not in GRANULARITIES:
        raise UserError(f"unknown score.granularity {out['granularity']!r}; use segment or query.")
    if not 0.0 < out["min_ok_fraction"] <= 1.0:
        raise UserError(f"score.min_ok_fraction={out['min_ok_fraction']} is outside (0, 1]; use e.g. 1.0.")
    for name, v in (("segments_per_call", out["segments_per_call"]), ("bootstrap", out["bootstrap"] + 1),
                    ("detection.batch_size", out["detection"]["batch_size"]),
                    ("fuzzing.batch_size", out["fuzzing"]["batch_size"]),
                    ("fuzzing.max_marks", out["fuzzing"]["max_marks"])):
        if v < 1:
            raise UserError(f"score.{name} must be at least 1 (bootstrap: 0 or more); got {v}.")
    return out


def run_score_stage(cfg: DictConfig, args: list[str]) -> None:
    if args:
        raise UserError(f"`safesail score` takes no arguments, got {' '.join(args)!r}; pass settings as "
                        "score.key=value.")
    sc = score_settings(cfg)
    rd = RunDir.from_cfg(cfg)
    expls = load_explanations(rd)
    keys = sorted(k for k in expls if sc["hooks"] is None or k[0] in set(sc["hooks"]))
    if sc["max_latents"]:
        keys = keys[: int(sc["max_latents"])]
    fp = fingerprint({"score": {k: v for k, v in sc.items() if k != "concurrency"},
                      "llm": OmegaConf.to_container(cfg.llm, resolve=True),
                      "explanations": [[h, l, explanation_key(r)] for (h, l), r in sorted(expls.items())]})
    if rd.stage_done("score", fp):
        log.info("score: already done for these explanations and settings; nothing to do")
        return
    from safesail.interpret.clients import make_client

    client = make_client(cfg.llm, rd.llm_cache_file, cache_dir=cfg.get("cache_dir"),
                         device=str(cfg.get("device", "auto")))
    asyncio.run(_score_all(rd, cfg, sc, client, expls, keys, fp))


async def _score_all(rd: RunDir, cfg: DictConfig, sc: dict, client, expls: dict, keys: list, fp: str) -> None:
    try:
        await score_latents(rd, cfg, sc, client, expls, keys)
    finally:
        await client.aclose()
    final = read_scores(rd.scores_file, sc["scorers"])
    summary = summarize([r for (h, l, _), r in final.items() if (h, l) in set(keys)], sc["min_beats_rate"])
    for kind, s in summary["kinds"].items():
        log.info("score %s: %s", kind, {k: v for k, v in s.items() if k != "failures"})
    for line in summary["warnings"]:
        log.warning("score: %s", line)
    retry = sum(1 for (h, l, _), r in final.items() if (h, l) in set(keys) and _has_retryable(r))
    if retry:  # not marked done: the next `safesail score` re-sends every item that failed retryably
        log.warning("score: %d records hold items whose LLM call failed; run `safesail score` again to retry them "
                    "(answered items come from the response cache)", retry)
        return
    rd.mark_stage("score", fp, **summary)


def _seed(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _compact(run: ScorerRun) -> dict:
    return {"value": run.value, "status": "ok" if run.value is not None else "failed", "failure": run.failure,
            **run.cost.as_dict(), "metrics": run.metrics,
            "items": [{k: it[k] for k in _COMPACT if k in it} for it in run.items]}


def _has_retryable(rec: ScoreRecord) -> bool:
    items = list(rec.details.get("items") or [])
    for c in (rec.details.get("controls") or {}).values():
        items += list((c or {}).get("items") or [])
    return any(it.get("status") == "retryable" for it in items) or "llm_error" in str(rec.failure or "")


async def score_latents(rd: RunDir, cfg: DictConfig, sc: dict, client, expls: dict, keys: list) -> None:
    """Score `keys` with every configured scorer; skip records that stand (same identity, nothing retryable)."""
    sem = asyncio.Semaphore(max(1, sc["concurrency"]))
    segs_by_hook = {h: load_score_segments(rd, h) for h in sorted({h for h, _ in keys})}
    windows = None
    if sc["granularity"] == "query" and "simulation" in sc["scorers"]:
        from safesail.interpret.scoring.windows import window_lookup

        windows = {h: window_lookup(rd, cfg, h, [s for k in keys if k[0] == h for s in segs_by_hook[h].get(k[1], [])],
                                    sc["query_max_tokens"]) for h in segs_by_hook}
    scorers = make_scorers(sc["scorers"], client, sc, sem, windows)
    partners = ctl.shuffled_partners(expls)
    log.info("score: %s with %s; controls %s", ", ".join(scorers), client.model_name, ", ".join(sc["controls"]) or
             "none")

    def identity(key, kind) -> dict:
        controls = {}
        if "shuffled" in sc["controls"]:
            p = partners.get(key)
            controls["shuffled"] = None if p is None else [p[0], p[1], explanation_key(expls[p])]
        if "constant" in sc["controls"]:
            controls["constant"] = sc["constant_explanation"]
        return _jsonable({"scorer": scorers[kind].identity(), "explanation_key": explanation_key(expls[key]),
                          "controls": controls, "bootstrap": sc["bootstrap"]})

    out_path = rd.scores_file
    stored = read_scores(out_path)
    todo = [(key, kind) for key in keys for kind in scorers
            if not ((s := stored.get((key[0], key[1], kind))) is not None
                    and s.details.get("identity") == identity(key, kind) and not _has_retryable(s))]
    log.info("score: %d explained latents x %d scorers, %d records stand, %d to do", len(keys), len(scorers),
             len(keys) * len(scorers) - len(todo), len(todo))
    rd.interpret.mkdir(parents=True, exist_ok=True)
    with ScoreWriter(out_path) as w, tqdm(total=len(todo), desc="score", unit="record") as bar:
        async def one(key, kind):
            rec = await _score_one(key, kind, scorers[kind], expls, partners, segs_by_hook, sc, identity(key, kind))
            w.write(rec)
            bar.update(1)

        await asyncio.gather(*(one(k, kind) for k, kind in todo))


async def _score_one(key, kind, scorer, expls, partners, segs_by_hook, sc, ident) -> ScoreRecord:
    hook, latent = key
    expl = expls[key]
    base = {"hook": hook, "layer": expl.get("layer"), "latent": latent, "kind": kind}
    details = {"identity": ident}
    if expl.get("status") != "ok" or not str(expl.get("explanation") or "").strip():
        return ScoreRecord(**base, status="failed", details=details,
                           failure=f"no_explanation: {expl.get('error') or 'the explanation is empty'}")
    examples = [Example.from_segment(s) for s in segs_by_hook[hook].get(latent, [])]
    if not examples:
        return ScoreRecord(**base, status="failed", details=details,
                           failure="no_score_segments: collect kept no held-out segments for this latent")
    text = str(expl["explanation"])
    partner = partners.get(key) if "shuffled" in sc["controls"] else None
    jobs = {"own": scorer.score(text, examples)}
    if partner is not None:
        jobs["shuffled"] = scorer.score(str(expls[partner]["explanation"]), examples)
    if "constant" in sc["controls"]:
        jobs["constant"] = scorer.score(sc["constant_explanation"], examples)
    runs = dict(zip(jobs, await asyncio.gather(*jobs.values())))
    own = runs["own"]
    lo, hi = (None, None)
    if own.value is not None and own.resample is not None:
        lo, hi = bootstrap_interval(own.resample, len(own.items), sc["bootstrap"], seed=_seed(hook, latent, kind))
    controls = {}
    if "shuffled" in sc["controls"]:
        controls["shuffled"] = (None if partner is None else
                                {"from": [partner[0], partner[1]], "explanation": str(expls[partner]["explanation"]),
                                 **_compact(runs["shuffled"])})
    if "constant" in runs:
        controls["constant"] = {"explanation": sc["constant_explanation"], **_compact(runs["constant"])}
    shuf = runs["shuffled"].value if "shuffled" in runs else None
    details.update(explanation=text, metrics=own.metrics, cached_calls=own.cost.cached_calls,
                   seconds=round(own.seconds, 4), items=own.items, controls=controls)
    return ScoreRecord(**base, value=own.value, ci_low=lo, ci_high=hi, control_shuffled=shuf,
                       control_constant=runs["constant"].value if "constant" in runs else None,
                       beats_shuffled=ctl.beats(own.value, shuf), n_examples=own.n_examples,
                       llm_calls=own.cost.llm_calls, prompt_tokens=own.cost.prompt_tokens,
                       completion_tokens=own.cost.completion_tokens,
                       status="ok" if own.value is not None else "failed", failure=own.failure, details=details)
