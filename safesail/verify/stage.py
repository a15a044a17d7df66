"""`safesail verify`: causal checks of the tagged (or candidate) latents -> `verify/effects.jsonl`.

Per latent (`checks.py`): output effect, necessity, sufficiency (against a random latent of
the same norm) and refusal; per (hook, domain) the difference-in-means direction of the
bundled pairs as a reference of the same norm. Work is done in units (one latent, or one
reference direction); after a unit's records are appended, its key goes to
`verify/done.jsonl`. A killed run redoes at most the unit it was in (greedy decoding, seeded
bootstrap and the LLM response cache make the records the same); a run with other settings
starts a fresh effects file. The model's refusal baseline per domain and language is
written to `verify/baseline.json`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, fields

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safesail.chat import encode_chat
from safesail.domains import DOMAINS
from safesail.errors import UserError
from safesail.hooks import HookPoint, capture_activations
from safesail.jsonl import append_jsonl, iter_jsonl, last_per_latent, open_append
from safesail.rundir import RunDir, atomic_write_json, fingerprint
from safesail.verify.checks import Answers, CheckSettings, QuerySet, Verifier
from safesail.verify.directions import diff_in_means
from safesail.verify.interventions import (DirectionEdit, Intervention, LatentEdit, SteerableSAE, scaled,
                                           steering_norm)
from safesail.verify.records import Effect, EffectWriter, effects_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DOMAIN_TOPICS = {"politics": "politics, government, elections or protest",
                 "pornography": "sex, nudity or pornography",
                 "violence": "violence, weapons or physically hurting people",
                 "terror": "terrorism, extremist groups or attacks on the public"}


@dataclass
class VerifySettings:
    latents: str = "tagged"          # tagged | candidates
    max_latents: int = 40
    strength: float = 8.0            # steering strength (normalized activation, x the 0.999 quantile)
    queries_per_domain: int = 4
    langs: tuple = ("en", "zh", "hi")
    reference_pairs: int = 24        # pairs (not among the test queries) for the diff-in-means direction
    segments: int = 6                # firing segments per latent for the necessity loss
    max_new_tokens: int = 24
    batch_size: int = 8
    top_tokens: int = 10
    n_boot: int = 200
    judge: bool = True
    reference: bool = True
    seed: int = 0

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "VerifySettings":
        d = OmegaConf.to_container(cfg.get("verify") or {}, resolve=True) or {}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"verify.{unknown[0]} is not a verify setting; see configs/verify/default.yaml.")
        s = cls(**{k: (tuple(v) if k == "langs" else v) for k, v in d.items() if v is not None})
        if s.latents not in ("tagged", "candidates"):
            raise UserError(f"verify.latents is {s.latents!r}; use tagged or candidates.")
        for name in ("max_latents", "queries_per_domain", "max_new_tokens", "batch_size", "n_boot"):
            if int(getattr(s, name)) < 1:
                raise UserError(f"verify.{name} is {getattr(s, name)}; set it to a positive integer.")
        if not 0 < float(s.strength) <= 100:
            raise UserError(f"verify.strength is {s.strength}; use a normalized activation in (0, 100], e.g. 8.")
        return s

    def checks(self) -> CheckSettings:
        return CheckSettings(self.max_new_tokens, self.batch_size, self.top_tokens, self.n_boot, self.seed)


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


def plan_latents(rd: RunDir, s: VerifySettings, hooks: list[str]) -> list[dict]:
    """[{hook, latent, domain, explanation, tagged}] in (hook, latent) order, at most max_latents.

    Tagged latents first choice; without any (or with latents=candidates), every collected latent,
    its domain from the tag stage's pair evidence when there is some.
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
    chosen = tagged if s.latents == "tagged" and tagged else keys
    if s.latents == "tagged" and not tagged:
        log.warning("verify: no latent is tagged with a safety domain; checking the candidate latents instead")
    out, by_pairs = [], {h: _select_domains(rd, h) for h in hooks}
    for hook, latent in chosen[:s.max_latents]:
        t = tags.get((hook, latent)) or {}
        doms = [d for d in t.get("tags") or [] if d in DOMAINS]
        e = expls.get((hook, latent)) or {}
        out.append({"hook": hook, "latent": int(latent), "tagged": bool(doms),
                    "domain": (doms[0] if doms else _pair_domain(t) or by_pairs[hook].get(int(latent))
                               or DOMAINS[int(latent) % len(DOMAINS)]),
                    "explanation": e.get("explanation") if e.get("status", "ok") == "ok" else None})
    return out


def query_sets(pairs, s: VerifySettings, tok, system_prompt) -> tuple[dict[str, QuerySet], dict[str, tuple]]:
    """Per domain: the test queries (round robin over languages) and the held-out reference pairs."""
    sets, refs = {}, {}
    for dom in sorted({p.domain for p in pairs}):
        by_lang = {lang: [p for p in pairs if p.domain == dom and p.lang == lang] for lang in s.langs}
        test = []
        while len(test) < s.queries_per_domain and any(by_lang.values()):
            for lang in s.langs:
                if by_lang[lang] and len(test) < s.queries_per_domain:
                    test.append(by_lang[lang].pop(0))
        held = [p for p in pairs if p.domain == dom and p not in test][:s.reference_pairs]
        enc = lambda q: encode_chat(tok, q, system_prompt)  # noqa: E731
        sets[dom] = QuerySet(dom, [p.lang for p in test], [enc(p.concept_query) for p in test],
                             [enc(p.neutral_query) for p in test])
        refs[dom] = ([enc(p.concept_query) for p in held], [enc(p.neutral_query) for p in held])
    return sets, refs


def load_steerable(rd: RunDir, hook: str, folder, device) -> SteerableSAE:
    from safesail.interpret.records import read_latent_stats
    from safesail.saes import load_sae

    stats = read_latent_stats(rd.latents(hook), hook)
    sae = load_sae(folder).to(device).eval()
    sae.requires_grad_(False)
    scales = {int(i): float(q) for i, q in zip(stats.latent_ids.tolist(), stats.quantile.tolist()) if q > 0}
    return SteerableSAE(HookPoint.parse(hook), sae, scales)


# ---- one unit of work ----------------------------------------------------------------------------

def _random_latent(s: SteerableSAE, latent: int, exclude: set[int], seed: int) -> int:
    rng = random.Random(f"{seed}:{s.hook.layer}:{latent}")
    while True:
        j = rng.randrange(s.n_latents)
        if j != latent and j not in exclude:
            return j


def verify_latent(v: Verifier, rd: RunDir, sae: SteerableSAE, item: dict, qs: QuerySet, s: VerifySettings,
                  exclude: set[int]) -> list[Effect]:
    from safesail.interpret.segments import load_segments

    hp, i = sae.hook, item["latent"]
    if i not in sae.scales:
        log.warning("verify: %s latent %d never fired in collect (no 0.999 quantile); skipped", hp, i)
        return []
    base = dict(hook=hp.name, layer=hp.layer, latent=i, target="latent", domain=qs.domain)
    steer = Intervention([sae], [LatentEdit(hp.layer, i, "add", s.strength)])
    ablate = Intervention([sae], [LatentEdit(hp.layer, i, "ablate")])
    v.baseline(qs)
    out = v.output_effect(base, sae.direction(i), steer, qs)

    def codes_of(ids):
        x = capture_activations(v.lm.model, ids, None, [hp])[hp.name][0]
        return sae.sae.encode(x)[:, i]

    path = rd.latents(hp.name) / "segments.jsonl"
    segs = [g for g in load_segments(path, latent=i) if g.get("kind") == "activating"][:s.segments] \
        if path.is_file() else []
    out += v.segment_loss(base, ablate, codes_of, segs)
    fires = [bool((codes_of(torch.tensor([p], device=v.lm.device)) > 0).any()) for p in qs.concept]
    ablated = v.answers(qs.concept, qs.langs, ablate)
    out += v.necessity_answers(base, ablated, qs, fires)
    steered = v.answers(qs.neutral, qs.langs, steer)
    j = _random_latent(sae, i, exclude, s.seed)
    norm = steering_norm(sae, i, s.strength)
    control = Intervention([sae], direction_edits=[DirectionEdit(hp.layer, scaled(sae.direction(j).float(), norm))])
    ctrl = v.answers(qs.neutral, qs.langs, control)
    cbase = dict(base, latent=j, target="random_latent")
    topic = item.get("explanation") or DOMAIN_TOPICS.get(qs.domain, qs.domain)
    out += v.sufficiency(base, topic, steered, qs, ctrl, {**cbase, "domain": qs.domain})
    out += v.refusal(base, "ablate", ablated, qs.base_concept, qs.langs)
    out += v.refusal(base, "steer", steered, qs.base_neutral, qs.langs)
    out += v.refusal({**cbase}, "steer", ctrl, qs.base_neutral, qs.langs)
    for e in out:
        e.details.setdefault("strength", s.strength)
        if e.target == "random_latent":
            e.details["control_for"] = i
        e.details.setdefault("explanation", item.get("explanation"))
    return out


def verify_reference(v: Verifier, sae: SteerableSAE, vector: torch.Tensor, qs: QuerySet, norm: float,
                     n_pairs: int) -> list[Effect]:
    hp = sae.hook
    base = dict(hook=hp.name, layer=hp.layer, latent=None, target="diff_in_means", domain=qs.domain)
    vec = scaled(vector.float(), norm)
    steer = Intervention([sae], direction_edits=[DirectionEdit(hp.layer, vec, "add")])
    remove = Intervention([sae], direction_edits=[DirectionEdit(hp.layer, vec, "project_out")])
    v.baseline(qs)
    out = v.output_effect(base, vec, steer, qs)
    ablated = v.answers(qs.concept, qs.langs, remove)
    out += v.necessity_answers(base, ablated, qs, None)
    steered = v.answers(qs.neutral, qs.langs, steer)
    out += v.sufficiency(base, DOMAIN_TOPICS.get(qs.domain, qs.domain), steered, qs, None, None)
    out += v.refusal(base, "ablate", ablated, qs.base_concept, qs.langs)
    out += v.refusal(base, "steer", steered, qs.base_neutral, qs.langs)
    for e in out:
        e.details.update(norm=round(norm, 5), raw_norm=round(float(vector.norm()), 5), pairs=n_pairs)
    return out


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


def run_verify_stage(cfg: DictConfig, args: list[str]) -> None:
    from safesail.models import load_model
    from safesail.train.pairs import load_pairs
    from safesail.train.selection import chosen_sae_dirs

    if args:
        raise UserError(f"`safesail verify` takes no arguments (got {' '.join(args)}); pass settings as "
                        "verify.key=value.")
    s = VerifySettings.from_cfg(cfg)
    rd = RunDir.from_cfg(cfg)
    sae_dirs = chosen_sae_dirs(cfg, rd.root)
    plan = plan_latents(rd, s, sorted(sae_dirs))
    pairs = load_pairs(cfg.select.get("pairs"))
    fp = fingerprint({"v": FORMAT_VERSION, "settings": vars(s), "model": cfg.model.name,
                      "saes": {h: str(p) for h, p in sae_dirs.items()}, "plan": plan,
                      "pairs": [p.id for p in pairs],
                      "judge": OmegaConf.to_container(cfg.llm, resolve=True) if s.judge else None})
    if rd.stage_done("verify", fp):
        log.info("verify: already done for these latents and settings; nothing to do")
        return
    out_dir = rd.root / "verify"
    done_path = out_dir / "done.jsonl"
    done = {r["unit"] for r in iter_jsonl(done_path) if r.get("fingerprint") == fp}
    if not done and effects_path(rd.root).exists():
        stale = out_dir / f"effects.{time.strftime('%Y%m%d-%H%M%S')}.stale.jsonl"
        effects_path(rd.root).rename(stale)
        log.info("verify: settings or inputs changed; the old records are kept in %s", stale)
    t_start = time.perf_counter()
    lm = load_model(cfg.model, cfg.get("device", "auto"), cache_dir=cfg.get("cache_dir"))
    saes = {h: load_steerable(rd, h, f, lm.device) for h, f in sae_dirs.items()}
    sets, refs = query_sets(pairs, s, lm.tokenizer, cfg.model.get("system_prompt"))
    loop = asyncio.new_event_loop()
    judge = client = None
    if s.judge:
        from safesail.interpret.clients import make_client
        from safesail.verify.judge import judge_many

        client = make_client(cfg.llm, rd.interpret / "llm_cache.sqlite", cache_dir=cfg.get("cache_dir"),
                             device=str(cfg.get("device", "auto")))
        judge = lambda topic, texts: judge_many(loop, client, topic, texts)  # noqa: E731
    v = Verifier(lm, s.checks(), judge)
    units = []
    if s.reference:
        units += [("ref", h, d) for h in sorted({p["hook"] for p in plan}) for d in
                  sorted({p["domain"] for p in plan if p["hook"] == h})]
    units += [("latent", p["hook"], p) for p in plan]
    exclude = {h: {p["latent"] for p in plan if p["hook"] == h} for h in saes}
    n_records, timings = 0, []
    with EffectWriter(effects_path(rd.root)) as w, open_append(done_path) as df:
        for kind, hook, x in tqdm(units, desc="verify", unit="unit"):
            key = f"{kind}:{hook}:{x if kind == 'ref' else x['latent']}"
            if key in done:
                continue
            t0 = time.perf_counter()
            sae = saes[hook]
            if kind == "ref":
                concept, neutral = refs[x]
                norms = [steering_norm(sae, p["latent"], s.strength) for p in plan
                         if p["hook"] == hook and p["domain"] == x and p["latent"] in sae.scales]
                if not norms or not concept:
                    effects = []
                else:
                    vec = diff_in_means(lm, sae.hook, concept, neutral)
                    effects = verify_reference(v, sae, vec, sets[x], float(torch.tensor(norms).median()),
                                               len(concept))
            else:
                effects = verify_latent(v, rd, sae, x, sets[x["domain"]], s, exclude[hook])
            w.write(effects)
            n_records += len(effects)
            dt = time.perf_counter() - t0
            timings.append(dt)
            append_jsonl(df, {"unit": key, "fingerprint": fp, "records": len(effects), "seconds": round(dt, 2)})
    for qs in sets.values():
        if any(p["domain"] == qs.domain for p in plan):
            v.baseline(qs)
    atomic_write_json(out_dir / "baseline.json", {"model": lm.name, "max_new_tokens": s.max_new_tokens,
                                                  "domains": _baseline_summary(sets)})
    if client is not None:
        loop.run_until_complete(client.aclose())
    loop.close()
    rd.mark_stage("verify", fp, latents=len(plan), units=len(units), records_this_run=n_records,
                  seconds=round(time.perf_counter() - t_start, 1),
                  mean_unit_s=round(sum(timings) / len(timings), 2) if timings else None)
