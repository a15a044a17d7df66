"""A wave of verify units (latents and reference directions) run together.

Every condition of every unit of a wave (ablated concept queries, steered and random-latent
neutral queries, the reference direction's project-out and add) becomes rows of the same
batched `generate` and refusal passes, each row with its own intervention
(`interventions.PerRow`); the corpus segments of all latents are scored in one unmodified
and one per-row ablated pass; the judge gets every (topic, answer) of the wave in one
concurrent batch. Results equal running the units one at a time (per-row edits are tested
equal to single-row runs).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from safesail.verify.checks import QuerySet, Verifier
from safesail.verify.generation import generate_full, token_logprobs
from safesail.verify.interventions import (
    DirectionEdit,
    Intervention,
    LatentEdit,
    SteerableSAE,
    scaled,
    steering_norm,
)
from safesail.verify.records import Effect
from safesail.verify.steering import quantile_strength

log = logging.getLogger(__name__)

DOMAIN_TOPICS = {"politics": "politics, government, elections or protest",
                 "pornography": "sex, nudity or pornography",
                 "violence": "violence, weapons or physically hurting people",
                 "terror": "terrorism, extremist groups or attacks on the public"}


def random_latent(s: SteerableSAE, latent: int, exclude: set[int], seed: int) -> int:
    return random_latents(s, latent, exclude, seed, 1)[0]


def random_latents(s: SteerableSAE, latent: int, exclude: set[int], seed: int, k: int) -> list[int]:
    """k distinct random control latents (seeded by the latent; the first is the same for every k)."""
    rng, out = random.Random(f"{seed}:{s.hook.layer}:{latent}"), []
    while len(out) < min(k, s.n_latents - len(exclude | {latent})):
        j = rng.randrange(s.n_latents)
        if j != latent and j not in exclude and j not in out:
            out.append(j)
    return out


@dataclass
class Unit:
    """One latent (`kind="latent"`) or one (hook, domain) reference direction (`kind="ref"`)."""
    key: str
    kind: str
    sae: SteerableSAE
    qs: QuerySet
    base: dict
    item: dict = field(default_factory=dict)
    steer: Intervention | None = None
    ablate: Intervention | None = None       # project-out for a reference direction
    control: Intervention | None = None
    control_latent: int | None = None
    more_control_latents: list[int] = field(default_factory=list)   # verify.random_latents > 1: the others
    more_controls: list[Intervention] = field(default_factory=list)
    direction: torch.Tensor | None = None
    segments: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    out: dict = field(default_factory=dict)   # filled by run_wave


def latent_unit(key: str, sae: SteerableSAE, item: dict, qs: QuerySet, strength: float, exclude: set[int],
                seed: int, segments: list[dict], resid_norm: float | None = None, positions: str = "all",
                n_random: int = 1) -> Unit | None:
    """`resid_norm`: strengths are multiples of this residual-stream norm (`steering.py`); None: of the
    latent's 0.999 quantile. `positions`: where the latent and its random control are added
    (`interventions.POSITIONS`). `n_random`: random control latents of the same norm (their mean p(yes) per
    query is the control: `Verifier.sufficiency`)."""
    hp, i = sae.hook, item["latent"]
    if i not in sae.scales:
        log.warning("verify: %s latent %d never fired in collect (no 0.999 quantile); skipped", hp, i)
        return None
    controls = random_latents(sae, i, exclude, seed, max(1, int(n_random)))
    u = Unit(key, "latent", sae, qs, {"hook": hp.name, "layer": hp.layer, "latent": i, "target": "latent",
                                      "domain": qs.domain},
             item=item, ablate=Intervention([sae], [LatentEdit(hp.layer, i, "ablate")]),
             control_latent=controls[0], more_control_latents=controls[1:], direction=sae.direction(i),
             segments=segments)
    if resid_norm is not None:
        u.extra["resid_norm"] = float(resid_norm)
    if positions != "all":
        u.extra["positions"] = positions
    set_strength(u, strength)
    return u


def steer_intervention(u: Unit, strength: float) -> tuple[Intervention, float]:
    """Adding the latent at `strength` (in the unit's units) and that strength x its 0.999 quantile."""
    hp, i, sae = u.sae.hook, u.base["latent"], u.sae
    q = float(strength)
    if u.extra.get("resid_norm") is not None:
        q = quantile_strength(sae.scales[i], float(sae.direction(i).norm()), strength, u.extra["resid_norm"])
    return Intervention([sae], [LatentEdit(hp.layer, i, "add", q)], max_strength=math.inf,
                        positions=u.extra.get("positions", "all")), q


def set_strength(u: Unit, strength: float) -> None:
    """Steer the latent at `strength`, and the random control latent with the same norm."""
    hp, i, sae = u.sae.hook, u.base["latent"], u.sae
    u.steer, q = steer_intervention(u, strength)
    norm = steering_norm(sae, i, q)
    u.control, *u.more_controls = [
        Intervention([sae], direction_edits=[DirectionEdit(hp.layer, scaled(sae.direction(j).float(), norm))],
                     positions=u.extra.get("positions", "all")) for j in [u.control_latent, *u.more_control_latents]]
    u.extra["strength"] = float(strength)
    if u.extra.get("resid_norm") is not None:
        u.extra["quantile_strength"] = round(q, 4)


def fluent(ids: list[int], mean_lp: float, base_lp: float, max_drop: float) -> bool:
    """An answer is fluent when it is not empty, not a loop (at least half its tokens distinct) and the
    unmodified model finds it at most `max_drop` nats per token less likely than its own answers."""
    return bool(ids) and len(set(ids)) >= 0.5 * len(ids) and mean_lp >= base_lp - max_drop


def calibrate(v: Verifier, units: list[Unit], strengths: list[float], n_queries: int, max_drop: float,
              from_top: bool = True) -> None:
    """Per latent: steer its first `n_queries` scan queries (`QuerySet.scan_set`: neutral queries of pairs that
    are not evaluated, when the stage gives some) at strengths of the scan and keep the largest
    strength at which at least 2/3 of the answers are fluent (the smallest one when none is); the scan goes
    to `details.scan`.

    `from_top` (the default): strengths are tried from the largest down, one round per strength with every
    latent still undecided in one batch, and a latent stops at its first fluent strength; that is the
    largest fluent one, so the strength kept is the full scan's (tested), and `details.scan` lists the
    strengths tried. Otherwise every strength of every latent is generated in one batch."""
    lat = [u for u in units if u.kind == "latent"]
    if not lat or not strengths:
        return
    rounds = [[st] for st in sorted(set(strengths), reverse=True)] if from_top else [list(strengths)]
    base_lp: dict = {}
    scans: dict[int, list[dict]] = {id(u): [] for u in lat}
    todo = list(lat)
    for sts in rounds:
        if not todo:
            break
        for u, scan in zip(todo, _scan_round(v, todo, sts, n_queries, max_drop, base_lp)):
            scans[id(u)] += scan
        todo = [u for u in todo if not any(x["fluent"] >= 2 / 3 for x in scans[id(u)])]
    for u in lat:
        scan = sorted(scans[id(u)], key=lambda x: x["strength"])
        good = [x["strength"] for x in scan if x["fluent"] >= 2 / 3]
        set_strength(u, max(good) if good else min(strengths))
        u.extra["scan"] = scan


def _scan_round(v: Verifier, lat: list[Unit], strengths: list[float], n_queries: int, max_drop: float,
                base_lp: dict) -> list[list[dict]]:
    """Per latent, {strength, fluent, changed} of its first `n_queries` scan queries steered at each of
    `strengths`, all rows in one batch; `base_lp` caches the unmodified answers' mean log-probs."""
    rows = []   # (unit, strength, query index)
    for u in lat:
        for st in strengths:
            rows += [(u, st, q) for q in range(min(n_queries, len(u.qs.scan_set[0])))]
    ivs = {(id(u), st): steer_intervention(u, st)[0] for u in lat for st in strengths}
    prompts = [u.qs.scan_set[0][q] for u, _, q in rows]
    ans = generate_full(v.lm, prompts, v.s.max_new_tokens, v.s.batch_size, [ivs[(id(u), st)] for u, st, _ in rows]).ids
    base_rows = [b for b in {(id(u.qs), q): (u.qs, q) for u, _, q in rows}.values() if (id(b[0]), b[1]) not in base_lp]
    seqs = [p + a for p, a in zip(prompts, ans)] + [qs.scan_set[0][q] + qs.scan_set[1].ids[q] for qs, q in base_rows]
    lps, _ = token_logprobs(v.lm, seqs, v.s.batch_size)

    def mean_lp(k: int, n_prompt: int, n_ans: int) -> float:
        return float(lps[k][n_prompt - 1:n_prompt - 1 + n_ans].mean()) if n_ans else float("-inf")

    for k, (qs, q) in enumerate(base_rows):
        base_lp[(id(qs), q)] = mean_lp(len(rows) + k, len(qs.scan_set[0][q]), len(qs.scan_set[1].ids[q]))
    out = []
    for u in lat:
        scan = []
        for st in strengths:
            ks = [k for k, (uu, s2, _) in enumerate(rows) if uu is u and s2 == st]
            ok = [fluent(ans[k], mean_lp(k, len(prompts[k]), len(ans[k])), base_lp[(id(u.qs), rows[k][2])], max_drop)
                  for k in ks]
            changed = [ans[k] != u.qs.scan_set[1].ids[rows[k][2]] for k in ks]
            scan.append({"strength": st, "fluent": sum(ok) / len(ok), "changed": sum(changed) / len(changed)})
        out.append(scan)
    return out


def reference_unit(key: str, sae: SteerableSAE, vector: torch.Tensor, qs: QuerySet, norm: float,
                   n_pairs: int, positions: str = "all") -> Unit:
    hp = sae.hook
    vec = scaled(vector.float(), norm)
    extra = {"norm": round(norm, 5), "raw_norm": round(float(vector.norm()), 5), "pairs": n_pairs}
    if positions != "all":
        extra["positions"] = positions
    return Unit(key, "ref", sae, qs, {"hook": hp.name, "layer": hp.layer, "latent": None, "target": "diff_in_means",
                                          "domain": qs.domain},
                steer=Intervention([sae], direction_edits=[DirectionEdit(hp.layer, vec, "add")], positions=positions),
                ablate=Intervention([sae], direction_edits=[DirectionEdit(hp.layer, vec, "project_out")]),
                direction=vec, extra=extra)


# ---- batched corpus-segment and query passes ---------------------------------------------------------

def _segment_losses(v: Verifier, units: list[Unit]) -> None:
    """unit.out["segments"]: the per-segment loss change where the latent fires (ablated - unmodified)."""
    rows = [(u, g) for u in units if u.kind == "latent" for g in u.segments if len(g["token_ids"]) >= 2]
    for u in units:
        u.out["segments"] = []
    if not rows:
        return
    seqs = [list(g["token_ids"]) for _, g in rows]
    hooks = sorted({u.sae.hook for u, _ in rows}, key=lambda h: h.layer)
    base, acts = token_logprobs(v.lm, seqs, v.s.batch_size, capture=hooks)
    fires = []
    for (u, _), a in zip(rows, acts):
        x = a[u.sae.hook.name].to(u.sae.sae.W_dec.dtype)
        fires.append(u.sae.sae.encode(x)[:, u.base["latent"]] > 0)
    keep = [k for k, f in enumerate(fires) if bool(f[:-1].any())]
    abl, _ = token_logprobs(v.lm, [seqs[k] for k in keep], v.s.batch_size, ivs=[rows[k][0].ablate for k in keep])
    for k, lp1 in zip(keep, abl):
        f = fires[k][:-1]
        rows[k][0].out["segments"].append(float((base[k] - lp1)[f].mean()))


def _fires_on_concept(v: Verifier, units: list[Unit]) -> None:
    """unit.out["fires"]: per concept query, whether the latent fires anywhere in it (one pass per query set)."""
    by_set: dict[int, list[Unit]] = {}
    for u in units:
        if u.kind == "latent":
            by_set.setdefault(id(u.qs), []).append(u)
    for group in by_set.values():
        qs = group[0].qs
        hooks = sorted({u.sae.hook for u in group}, key=lambda h: h.layer)
        _, acts = token_logprobs(v.lm, [p for p in qs.concept], v.s.batch_size, capture=hooks)
        for u in group:
            u.out["fires"] = [bool((u.sae.sae.encode(a[u.sae.hook.name].to(u.sae.sae.W_dec.dtype))
                                    [:, u.base["latent"]] > 0).any()) for a in acts]


# ---- the wave -------------------------------------------------------------------------------------------

def _topic(u: Unit) -> str:
    if u.kind == "ref":
        return DOMAIN_TOPICS.get(u.qs.domain, u.qs.domain)
    return u.item.get("explanation") or DOMAIN_TOPICS.get(u.qs.domain, u.qs.domain)


def run_wave(v: Verifier, units: list[Unit], scan: list[float] | None = None, scan_queries: int = 3,
             max_drop: float = 3.0, scan_from_top: bool = True) -> dict[str, list[Effect]]:
    """The records of each unit (by key), every unit's conditions computed in shared batches; with `scan`,
    each latent's steering strength is first calibrated (`calibrate`)."""
    return start_wave(v, units, scan, scan_queries, max_drop, scan_from_top)()


def start_wave(v: Verifier, units: list[Unit], scan: list[float] | None = None, scan_queries: int = 3,
               max_drop: float = 3.0, scan_from_top: bool = True,
               between: Callable[[], None] | None = None) -> Callable[[], dict[str, list[Effect]]]:
    """`run_wave` in two halves: the source model's work now, and a function that builds the records.

    The judge's questions are asked as soon as their answers exist, without waiting (`prejudge(wait=False)`):
    the unmodified answers' before the scan, the steered and random-latent answers' before the ablated
    answers, corpus segments and firing checks are computed; with an `overlap.BackgroundJudge` they are
    answered meanwhile (and while the caller starts the next wave). `between` is called once the judged
    conditions are asked (the stage writes the previous wave's records there). The returned function waits
    for this wave's replies and builds the records."""
    v.baselines(list({id(u.qs): u.qs for u in units}.values()))
    asked = []
    if v.judge is not None and "absolute" in v.s.judge_modes:
        asked = [(_topic(u), t) for u in units if _topic(u) for t in u.qs.base_neutral.texts]
        v.prejudge(asked, wait=False)
    calibrate(v, units, list(scan or []), scan_queries, max_drop, scan_from_top)

    def conditions(names: tuple[str, ...]) -> None:
        reqs, where = [], []
        for u in units:
            qs = u.qs
            for name, prompts, langs, iv in (("ablated", qs.concept, qs.langs, u.ablate),
                                             ("steered", qs.neutral, qs.nlangs, u.steer),
                                             ("control", qs.neutral, qs.nlangs, u.control)):
                if iv is not None and name in names:
                    where.append((u, name))
                    reqs.append((prompts, langs, iv))
            for j, iv in enumerate(u.more_controls if "control" in names else []):
                where.append((u, f"control{j + 1}"))
                reqs.append((qs.neutral, qs.nlangs, iv))
        for (u, name), ans in zip(where, v.answers_many(reqs)):
            u.out[name] = ans

    conditions(("steered", "control"))      # the judged conditions first
    for u in units:
        u.out["next"] = u.out["steered"].first    # next-token log-probs of the steered neutral queries
    if v.judge is not None:
        for u in units:
            asked += v.judge_items(_topic(u), u.out["steered"], u.qs, u.out.get("control"), _more(u))
        v.prejudge(asked, wait=False)
    if between is not None:
        between()
    conditions(("ablated",))
    _segment_losses(v, units)
    _fires_on_concept(v, units)

    def records() -> dict[str, list[Effect]]:
        v.prejudge(asked)      # collect the replies asked above
        return {u.key: finish(v, u) for u in units}
    return records


def _more(u: Unit) -> list:
    """The answers under the further random control latents (verify.random_latents > 1)."""
    return [u.out[f"control{j + 1}"] for j in range(len(u.more_controls))]


def finish(v: Verifier, u: Unit) -> list[Effect]:
    qs, base = u.qs, u.base
    out = v.output_effect(base, u.direction, u.out["next"], qs)
    ablated, steered, ctrl = u.out["ablated"], u.out["steered"], u.out.get("control")
    if u.kind == "latent":
        out += v.segment_loss(base, u.out["segments"], len(u.segments))
        out += v.necessity_answers(base, ablated, qs, u.out["fires"])
        cbase = dict(base, latent=u.control_latent, target="random_latent")
        more = [(a, dict(base, latent=j, target="random_latent")) for a, j in zip(_more(u), u.more_control_latents)]
        out += v.sufficiency(base, _topic(u), steered, qs, ctrl, cbase, more)
    else:
        out += v.necessity_answers(base, ablated, qs, None)
        out += v.sufficiency(base, _topic(u), steered, qs, None, None)
    out += v.refusal(base, "ablate", ablated, qs.base_concept, qs.langs)
    out += v.refusal(base, "steer", steered, qs.base_neutral, qs.nlangs)
    if ctrl is not None:
        out += v.refusal(dict(base, latent=u.control_latent, target="random_latent"), "steer", ctrl,
                         qs.base_neutral, qs.nlangs)
    for e in out:
        if u.kind == "latent":
            e.details.setdefault("strength", u.extra["strength"])
            for k in ("quantile_strength", "resid_norm", "positions"):
                if k in u.extra:
                    e.details.setdefault(k, u.extra[k])
            if "scan" in u.extra and e.check == "sufficiency" and e.target == "latent":
                e.details["scan"] = u.extra["scan"]
            if e.target == "random_latent":
                e.details["control_for"] = base["latent"]
            e.details.setdefault("explanation", u.item.get("explanation"))
        else:
            e.details.update(u.extra)
    return out
