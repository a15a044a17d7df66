"""`safesail verify`: causal checks of the tagged (or candidate) latents -> `verify/effects.jsonl`.

Per latent (`checks.py`): output effect, necessity, sufficiency (against a random latent of
the same norm) and refusal; per (hook, domain) the difference-in-means direction of the
bundled pairs as a reference of the same norm; with `verify.residual_direction`, per domain the
residual-stream refusal direction (`residual_direction.py`, one unit each, after the waves: it
edits the whole model, not one batch row). Settings: `settings.py`. Work is done in units (one latent, or one
reference direction), run `verify.wave` units at a time with all their conditions in shared
batches (`wave.py`); after a wave's records are appended, its units' keys go to
`verify/done.jsonl` with each unit's own fingerprint (the settings that change its records,
and what it is). A killed run redoes at most the wave it was in (waves are fixed slices of the
unit list, so a redone wave computes in the same batches; greedy decoding, seeded bootstrap
and the LLM response cache make the records the same). A later run keeps every unit whose
fingerprint still holds, so raising `verify.max_latents` adds units rather than starting
over; records of units no longer planned or no longer valid are dropped from the effects
file (the old file is kept as `*.stale.jsonl`). The model's refusal baseline per domain and
language is written to `verify/baseline.json`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safesail.domains import DOMAINS
from safesail.errors import UserError
from safesail.hooks import HookPoint, decoder_layers
from safesail.jsonl import append_jsonl, iter_jsonl, last_per_latent, open_append
from safesail.rundir import RunDir, atomic_write_json, fingerprint
from safesail.verify import residual_direction
from safesail.verify.checks import QuerySet, Verifier
from safesail.verify.directions import diffs_in_means
from safesail.verify.generation import residual_norms
from safesail.verify.interventions import SteerableSAE, parse_neuron_id, steering_norm
from safesail.verify.judge_engine import quantize_judge
from safesail.verify.overlap import judge_batches, judge_engine_counter, overlap_judge
from safesail.verify.queries import _round_robin, query_sets  # noqa: F401  (re-exported: benchmarks import them here)
from safesail.verify.records import Effect, EffectWriter, effects_path
from safesail.verify.settings import VerifySettings, check_residual_layers
from safesail.verify.wave import (  # noqa: F401
    DOMAIN_TOPICS,
    latent_unit,
    reference_unit,
    run_wave,
    start_wave,
)

log = logging.getLogger(__name__)

RESIDUAL_TARGETS = (residual_direction.TARGET, residual_direction.CONTROL_TARGET)

FORMAT_VERSION = 3
# ---- what to verify ---------------------------------------------------------------------------

def _pair_domain(tag_rec: dict | None) -> str | None:
    pairs = ((tag_rec or {}).get("evidence") or {}).get("pairs") or {}
    best = max(pairs.items(), key=lambda kv: kv[1].get("concept_rate", 0) - kv[1].get("neutral_rate", 0),
               default=None)
    return best[0] if best else None


def _collected(rd: RunDir, hook: str) -> list[int]:
    from safetensors import safe_open

    path = rd.latents(hook) / "stats.safetensors"
    if not path.is_file():
        return []
    with safe_open(str(path), framework="pt") as f:
        return [int(i) for i in f.get_tensor("latent_ids").tolist()]


def _select_domains(rd: RunDir, hook: str) -> dict[int, str]:
    """latent -> the domain whose concept queries it prefers most (select stage's pair statistics)."""
    from safesail.train.selection import load_pair_stats, pair_stats_path

    if not pair_stats_path(rd.root, hook).is_file():
        return {}
    st = load_pair_stats(rd.root, hook)
    doms = [d for d in DOMAINS if f"{d}.concept_rate" in st]
    if not doms:
        return {}
    diff = torch.stack([st[f"{d}.concept_rate"] - st[f"{d}.neutral_rate"] for d in doms])
    return {int(j): doms[int(k)] for j, k in zip(st["latent_ids"].tolist(), diff.argmax(0).tolist())}


def _scores(rd: RunDir) -> dict[tuple[str, int], dict]:
    """(hook, latent) -> its last simulation score record (another scorer's when it has no simulation)."""
    out: dict[tuple[str, int], dict] = {}
    for rec in iter_jsonl(rd.interpret / "scores.jsonl"):
        try:
            key = (str(rec["hook"]), int(rec["latent"]))
        except (KeyError, TypeError, ValueError):
            continue
        if rec.get("kind") == "simulation" or out.get(key, {}).get("kind") != "simulation":
            out[key] = rec
    return out


def score_rank(rec: dict | None) -> tuple[int, float]:
    """How informative a latent's check is likely to be: an explanation that beats its shuffled control
    first, then by its score (none or a failed score last)."""
    rec = rec or {}
    value = rec.get("value")
    if rec.get("status", "ok") != "ok" or value is None:
        return (0, float("-inf"))
    return (1 if rec.get("beats_shuffled") else 0, float(value))


def informative_order(items: list[dict], scores: dict[tuple[str, int], dict]) -> list[dict]:
    """Items in round robin over their (hook, domain) groups, each group best score first and the groups in
    the order of their best latent: a capped plan checks the best-explained latent of every layer and domain
    before the second of any."""
    def rank(it):
        r = score_rank(scores.get((it["hook"], it["latent"])))
        return (-r[0], -r[1], HookPoint.parse(it["hook"]).layer, it["latent"])

    groups: dict[tuple[str, str], list[dict]] = {}
    for it in sorted(items, key=rank):
        groups.setdefault((it["hook"], it["domain"]), []).append(it)
    ordered = list(groups.values())      # already in the order of their best (first) item
    out = []
    for r in range(max((len(g) for g in ordered), default=0)):
        out += [g[r] for g in ordered if r < len(g)]
    return out


def plan_latents(rd: RunDir, s: VerifySettings, hooks: list[str]) -> tuple[list[dict], dict[str, set[int]]]:
    """[{hook, latent, domain, explanation, tagged}], at most max_latents in `informative_order`, and per
    hook the latents a random control may not be (every eligible one, however many are planned).

    Tagged latents first choice; without any (or with latents=candidates), every collected latent,
    its domain from the tag stage's pair evidence when there is some. A list of ids (`verify.latents:
    ["7_850", "29_4252:pornography"]`) is taken whole and in its order, its `:domain` first.
    """
    tags = last_per_latent(rd.interpret / "tags.jsonl")
    expls = last_per_latent(rd.interpret / "explanations.jsonl")
    keys = {k for k in set(tags) | set(expls) if k[0] in hooks}
    keys |= {(h, i) for h in hooks for i in _collected(rd, h)}
    if not keys:
        raise UserError(f"no latent statistics under {rd.root / 'latents'}; run `safesail collect` (and "
                        "`safesail explain`, `safesail tag`) first.")
    keys = sorted(keys)
    tagged = [k for k in keys if (tags.get(k) or {}).get("tags")]
    named = _named_latents(s.latents, hooks) if not isinstance(s.latents, str) else None
    chosen = list(named) if named is not None else tagged if s.latents == "tagged" and tagged else keys
    if s.latents == "tagged" and not tagged:
        log.warning("verify: no latent is tagged with a safety domain; checking the candidate latents instead")
    # a random control is never a checked latent, nor (for a named list) a tagged one
    exclude = {h: {i for hh, i in chosen + (tagged if named is not None else []) if hh == h} for h in hooks}
    items, by_pairs = [], {h: _select_domains(rd, h) for h in hooks}
    for hook, latent in chosen:
        t = tags.get((hook, latent)) or {}
        doms = [d for d in t.get("tags") or [] if d in DOMAINS]
        e = expls.get((hook, latent)) or {}
        items.append({"hook": hook, "latent": int(latent), "tagged": bool(doms),
                      "domain": ((named or {}).get((hook, latent))
                                 or (doms[0] if doms else _pair_domain(t) or by_pairs[hook].get(int(latent))
                                     or DOMAINS[int(latent) % len(DOMAINS)])),
                      "explanation": e.get("explanation") if e.get("status", "ok") == "ok" else None})
    if named is not None:         # the researcher's list, in its order, whole
        return items, exclude
    return informative_order(items, _scores(rd))[:s.max_latents], exclude


def _named_latents(ids: list[str], hooks: list[str]) -> dict[tuple[str, int], str | None]:
    """`verify.latents: [7_850, 29_4252:pornography]` -> {(hook, latent): domain or None}, in the list's order;
    a layer without a trained SAE in this run is one sentence."""
    by_layer = {HookPoint.parse(h).layer: h for h in hooks}
    out: dict[tuple[str, int], str | None] = {}
    for item in ids:
        ident, _, domain = str(item).partition(":")
        layer, latent = parse_neuron_id(ident)
        if layer not in by_layer:
            raise UserError(f"verify.latents has {item!r}, but this run has SAEs at layers "
                            f"{', '.join(str(x) for x in sorted(by_layer))} only; pick a latent of one of them.")
        out[(by_layer[layer], latent)] = domain or None
    return out


def _scale_uncollected(plan: list[dict], saes: dict[str, SteerableSAE], unit: str) -> None:
    """A named latent that collect did not cover has no 0.999 quantile: in residual units it needs none (its
    steering norm is strength x R), so it gets the scale 1; in quantile units it is one sentence."""
    missing = [p for p in plan if p["latent"] not in saes[p["hook"]].scales]
    if missing and unit != "residual":
        p = missing[0]
        raise UserError(f"verify.latents has {HookPoint.parse(p['hook']).layer}_{p['latent']}, which collect did not "
                        "cover (no 0.999 quantile to scale its strength by); set verify.strength_unit=residual, or "
                        "collect it first (collect.latents).")
    for p in missing:
        saes[p["hook"]].scales[p["latent"]] = 1.0
        p["uncollected"] = True
    if missing:
        log.info("verify: %d named latents were not collected; steered in residual units (scale 1)", len(missing))


def load_steerable(rd: RunDir, hook: str, folder, device) -> SteerableSAE:
    from safesail.interpret.records import read_latent_stats
    from safesail.saes import load_sae

    stats = read_latent_stats(rd.latents(hook), hook)
    sae = load_sae(folder).to(device).eval()
    sae.requires_grad_(False)
    scales = {int(i): float(q) for i, q in zip(stats.latent_ids.tolist(), stats.quantile.tolist()) if q > 0}
    return SteerableSAE(HookPoint.parse(hook), sae, scales)


# ---- the stage ---------------------------------------------------------------------------------------

def _baseline_summary(sets: dict[str, QuerySet]) -> dict:
    out = {}
    for dom, qs in sets.items():
        if qs.base_concept is None:
            continue
        per = {}
        for lang in sorted(set(qs.langs)):
            idx = [k for k, x in enumerate(qs.langs) if x == lang]
            per[lang] = {"n": len(idx), "refusal_rate": sum(qs.base_concept.refused[k] for k in idx) / len(idx),
                         "refusal_logprob": sum(qs.base_concept.refusal_lp[k] for k in idx) / len(idx),
                         "neutral_refusal_rate": sum(qs.base_neutral.refused[k] for k in idx) / len(idx)}
        out[dom] = {"n": len(qs.langs), "refusal_rate": sum(qs.base_concept.refused) / len(qs.langs),
                    "per_lang": per, "answers": qs.base_concept.texts}
    return out


def _sae_identity(root, folder) -> str:
    """What a unit's fingerprint knows of its SAE: the training fingerprint in its cfg.json (so a retrained SAE
    redoes its units and a copied or moved run directory does not), else its folder relative to the run."""
    from pathlib import Path

    from safesail.saes.io import read_cfg

    fp = read_cfg(folder).extra.get("fingerprint")
    if fp:
        return f"trained:{fp}"
    folder = Path(folder)
    return str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder)


def _unit_key(rec: dict) -> str | None:
    """The unit an effects record belongs to (its latent's, its control's, or its reference's)."""
    if rec.get("target") == "diff_in_means":
        return f"ref:{rec.get('hook')}:{rec.get('domain')}"
    if rec.get("target") in RESIDUAL_TARGETS:
        return f"resid:{rec.get('domain')}"
    latent = (rec.get("details") or {}).get("control_for") if rec.get("target") == "random_latent" \
        else rec.get("latent")
    return f"latent:{rec.get('hook')}:{latent}"


def _keep_only(path, keep: set[str]) -> None:
    """Drop the records of units not in `keep` from the effects file (the old file kept as *.stale.jsonl)."""
    recs = list(iter_jsonl(path))
    kept = [r for r in recs if _unit_key(r) in keep]
    if len(kept) == len(recs):
        return
    stale = path.with_name(f"effects.{time.strftime('%Y%m%d-%H%M%S')}.stale.jsonl")
    path.rename(stale)
    with EffectWriter(path) as w:
        w.write([Effect.from_json(r) for r in kept])
    log.info("verify: %d records of units no longer planned or valid dropped (old file: %s)",
             len(recs) - len(kept), stale.name)


def run_verify_stage(cfg: DictConfig, args: list[str]) -> None:
    from safesail.interpret.segments import load_segments
    from safesail.models import load_model
    from safesail.train.pairs import load_pairs
    from safesail.train.selection import chosen_sae_dirs

    if args:
        raise UserError(f"`safesail verify` takes no arguments (got {' '.join(args)}); pass settings as "
                        "verify.key=value.")
    s = VerifySettings.from_cfg(cfg)
    rd = RunDir.from_cfg(cfg)
    sae_dirs = chosen_sae_dirs(cfg, rd.root)
    plan, exclude = plan_latents(rd, s, sorted(sae_dirs))
    pairs = load_pairs(cfg.select.get("pairs"))
    common = {"v": FORMAT_VERSION, "settings": s.unit_settings(), "model": cfg.model.name,
              "pairs": [p.id for p in pairs],
              "judge": OmegaConf.to_container(cfg.llm, resolve=True) if s.judge else None}
    sae_ids = {h: _sae_identity(rd.root, p) for h, p in sae_dirs.items()}
    fp = fingerprint({**common, "saes": sae_ids, "plan": plan,
                      "reference": s.reference, "wave": s.wave})
    if rd.stage_done("verify", fp):
        log.info("verify: already done for these latents and settings; nothing to do")
        return
    out_dir = rd.root / "verify"
    done_path = out_dir / "done.jsonl"
    t_start = time.perf_counter()
    cpu_start = (time.thread_time(), time.process_time())   # the main thread's CPU (SmolLM2) and all threads' (+ the judge)
    lm = load_model(cfg.model, cfg.get("device", "auto"), cache_dir=cfg.get("cache_dir"))
    saes = {h: load_steerable(rd, h, f, lm.device) for h, f in sae_dirs.items()}
    if not isinstance(s.latents, str):
        _scale_uncollected(plan, saes, s.strength_unit)
    if s.residual_direction:
        check_residual_layers(s, len(decoder_layers(lm.model)))
    sets, refs = query_sets(pairs, s, lm.tokenizer, cfg.model.get("system_prompt"))

    # strengths in units of the residual stream's norm after each hooked block (steering.py)
    resid = {}
    if s.strength_unit == "residual":
        # always on the twins, so a strength is the same push whichever prompts sufficiency steers
        twins = sets if s.sufficiency_prompts == "twins" else query_sets(
            pairs, dataclasses.replace(s, sufficiency_prompts="twins"), lm.tokenizer, cfg.model.get("system_prompt"))[0]
        neutral = [q for d in sorted(twins) for q in twins[d].neutral]
        resid = residual_norms(lm, [saes[h].hook for h in sorted({p["hook"] for p in plan})], neutral)
        log.info("verify: residual-stream norms %s", {h: round(r, 2) for h, r in resid.items()})

    def ref_norm(h: str, latent: int) -> float:
        return s.strength * resid[h] if resid else steering_norm(saes[h], latent, s.strength)

    # the units, each with the fingerprint of what its records depend on
    units = []
    if s.reference:
        for h in sorted({p["hook"] for p in plan}, key=lambda x: HookPoint.parse(x).layer):
            for d in sorted({p["domain"] for p in plan if p["hook"] == h}):
                norms = [ref_norm(h, p["latent"]) for p in plan
                         if p["hook"] == h and p["domain"] == d and p["latent"] in saes[h].scales]
                if norms and refs[d][0]:
                    norm = float(torch.tensor(norms).median())
                    units.append((f"ref:{h}:{d}", ("ref", h, d, norm),
                                  fingerprint({**common, "sae": sae_ids[h], "ref": [h, d, round(norm, 6)]})))
    if s.residual_direction:      # one residual-stream refusal direction per domain (runs after the waves)
        for d in sorted({p["domain"] for p in plan}):
            if refs[d][0]:
                units.append((f"resid:{d}", ("resid", None, d, None),
                              fingerprint({**common, "resid": [d, s.residual_layer, s.residual_layers,
                                                               s.residual_coef]})))
    for p in plan:
        units.append((f"latent:{p['hook']}:{p['latent']}", ("latent", p["hook"], p, None),
                      fingerprint({**common, "sae": sae_ids[p["hook"]], "item": p,
                                   "exclude": sorted(exclude[p["hook"]])})))
    done = {r["unit"]: r.get("fingerprint") for r in iter_jsonl(done_path)}
    valid = {k for k, _, ufp in units if done.get(k) == ufp}
    if effects_path(rd.root).exists():
        _keep_only(effects_path(rd.root), valid)

    loop = asyncio.new_event_loop()
    judge = client = None
    if s.judge:
        from safesail.interpret.clients import make_client
        from safesail.verify.judge import judge_many

        client = make_client(cfg.llm, rd.interpret / "llm_cache.sqlite", cache_dir=cfg.get("cache_dir"),
                             device=str(cfg.get("device", "auto")))
        judge_batches(client, s.judge_batch_size)
        quantize_judge(client, s.judge_quantize)
        judge = lambda items: judge_many(loop, client, items)
    judge, overlap_end = overlap_judge(judge, loop)
    judge_work = judge_engine_counter(client)
    v = Verifier(lm, s.checks(), judge)
    # every domain's unmodified answers in one fixed batch, so a resumed run reads the same baseline
    v.baselines([sets[d] for d in sorted({p["domain"] for p in plan})])

    dims: dict[tuple[str, str], torch.Tensor] = {}     # (hook, domain) -> its diff-in-means direction

    def build(key, spec):
        kind, hook, x, norm = spec
        sae = saes[hook]
        if kind == "ref":
            concept, neutral = refs[x]
            if (hook, x) not in dims:     # every hook of the domain still to do from one pass per prompt
                hooks = sorted({h for k, (kd, h, d, _), _ in units if kd == "ref" and d == x and k not in valid}
                               | {hook})
                got = diffs_in_means(lm, [saes[h].hook for h in hooks], concept, neutral)
                dims.update({(h, x): got[saes[h].hook.name] for h in hooks})
            return reference_unit(key, sae, dims.pop((hook, x)), sets[x], norm, len(concept), s.steer_positions)
        path = rd.latents(hook) / "segments.jsonl"
        segs = [g for g in load_segments(path, latent=x["latent"]) if g.get("kind") == "activating"][:s.segments] \
            if path.is_file() else []
        return latent_unit(key, sae, x, sets[x["domain"]], s.strength, exclude[hook], s.seed, segs,
                           resid.get(hook), s.steer_positions, s.random_latents)

    n_records, timings = 0, []
    in_waves = [u for u in units if u[1][0] != "resid"]     # a residual direction edits the model, not one row
    waves = [in_waves[i:i + s.wave] for i in range(0, len(in_waves), s.wave)]
    with EffectWriter(effects_path(rd.root)) as w, open_append(done_path) as df:
        def flush(built, records, t0) -> None:
            nonlocal n_records
            res = records()
            dt = time.perf_counter() - t0
            for k, _, _ in built:
                w.write(res.get(k, []))
                n_records += len(res.get(k, []))
            for k, ufp, _ in built:
                append_jsonl(df, {"unit": k, "fingerprint": ufp, "records": len(res.get(k, [])),
                                  "seconds": round(dt / len(built), 2)})
            timings.append(dt / len(built))

        pending = None     # the wave whose judge replies are still coming (written during the next wave)
        try:
            for wave in tqdm(waves, desc="verify", unit="wave"):
                todo = [(k, spec, ufp) for k, spec, ufp in wave if k not in valid]
                if not todo:
                    continue
                t0 = time.perf_counter()
                built = [(k, ufp, build(k, spec)) for k, spec, ufp in todo]
                prev, pending = pending, None      # written once this wave's judged answers are asked
                records = start_wave(v, [u for _, _, u in built if u is not None], s.strength_scan, s.scan_queries,
                                     s.fluency_drop, s.scan_from_top,
                                     between=None if prev is None else (lambda p=prev: flush(*p)))
                pending = (built, records, t0)
            if pending is not None:
                flush(*pending)
        finally:
            overlap_end()
        for k, spec, ufp in units:
            if spec[0] != "resid" or k in valid:
                continue
            t0 = time.perf_counter()
            recs = residual_direction.refusal_effects(v, sets[spec[2]], *refs[spec[2]], layer=s.residual_layer,
                                                     coef=s.residual_coef, seed=s.seed,
                                                     batch_size=s.batch_size, layers=s.residual_layers)
            w.write(recs)
            n_records += len(recs)
            append_jsonl(df, {"unit": k, "fingerprint": ufp, "records": len(recs),
                              "seconds": round(time.perf_counter() - t0, 2)})
    atomic_write_json(out_dir / "baseline.json", {"model": lm.name, "max_new_tokens": s.max_new_tokens,
                                                  "domains": _baseline_summary(sets)})
    if client is not None:
        loop.run_until_complete(client.aclose())
        if s.judge_quantize != "none":     # the shared model was quantized in place: nothing later may reuse it
            from safesail.interpret.clients.local_engine import release_engines
            release_engines()
    loop.close()
    rd.mark_stage("verify", fp, latents=len(plan), units=len(units), records_this_run=n_records,
                  seconds=round(time.perf_counter() - t_start, 1),
                  mean_unit_s=round(sum(timings) / len(timings), 2) if timings else None,
                  judge_wait_s=round(v.judge_wait_s, 1), judge_engine=judge_work(),
                  judge_jobs_by_threads=getattr(getattr(judge, "executor", None), "jobs_by_threads", None),
                  main_thread_cpu_s=round(time.thread_time() - cpu_start[0], 1),
                  process_cpu_s=round(time.process_time() - cpu_start[1], 1))
