"""The four causal checks of one direction (an SAE latent or a reference direction).

(a) output effect: the tokens the direction promotes / suppresses through the unembedding
    (direct logit effect), and the measured change of next-token log-probabilities on the
    domain's neutral queries when it is added;
(b) necessity: ablating it on the corpus segments where it fires (change of the loss on the
    next tokens there) and on the domain's concept queries (share of answers that change);
(c) sufficiency: steering the neutral queries with it; the judge LLM compares each steered answer
    with the random latent's (same norm) and with the unsteered answer to the same query ("which
    is more about the explanation?", order randomised: `paired_win_vs_*`, 0.5 = no effect), and
    says of each answer alone whether it is about the explanation (`on_concept_*`);
(d) refusal: refusal log-probability and phrase rate, their change under ablation (concept
    queries) and under steering (neutral queries), overall and per language.
Every figure is a mean over items with a bootstrap interval (`scoring.metrics.bootstrap_interval`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from safesail.interpret.scoring.metrics import bootstrap_interval
from safesail.verify.generation import generate_full, next_token_logprobs
from safesail.verify.interventions import Intervention
from safesail.verify.judge import PairItem, debiased, sign_test_p
from safesail.verify.records import Effect
from safesail.verify.refusal import from_opening_logprobs, is_refusal, opening_ids
from safesail.verify.stats import logodds_diffs, t_interval


@dataclass
class Answers:
    """Greedy answers of a list of prompts under one condition, with their refusal figures."""
    ids: list[list[int]]
    texts: list[str]
    refusal_lp: list[float]
    refused: list[bool]
    first: torch.Tensor | None = None     # [n, vocab] next-token log-probs after each prompt


@dataclass
class QuerySet:
    """A domain's concept queries and their neutral twins, with the unmodified model's answers."""
    domain: str
    langs: list[str]
    concept: list[list[int]]
    neutral: list[list[int]]
    base_concept: Answers | None = None
    base_neutral: Answers | None = None
    base_next: torch.Tensor | None = None      # [n_neutral, vocab] next-token log-probs
    judged_unsteered: dict[str, list] = field(default_factory=dict)   # topic -> verdicts
    neutral_langs: list[str] | None = None     # languages of `neutral` when it is longer than `concept`
    scan: list[list[int]] = field(default_factory=list)   # neutral queries of other pairs: the strength scan's
    scan_langs: list[str] = field(default_factory=list)
    base_scan: Answers | None = None

    @property
    def nlangs(self) -> list[str]:
        """The languages of the neutral queries (the first len(concept) are the concept queries' twins)."""
        return self.neutral_langs or self.langs

    @property
    def scan_set(self) -> tuple[list[list[int]], Answers | None]:
        """The strength scan's queries and their unmodified answers: `scan` when the stage gave some (never
        evaluated, so the strength is not chosen on the queries it is judged on), else the neutral queries."""
        return (self.scan, self.base_scan) if self.scan else (self.neutral, self.base_neutral)


@dataclass
class CheckSettings:
    max_new_tokens: int = 24
    batch_size: int = 8
    top_tokens: int = 10
    n_boot: int = 200
    seed: int = 0
    judge_modes: tuple[str, ...] = ("absolute",)


def mean_ci(values: list[float], s: CheckSettings) -> tuple[float | None, float | None, float | None]:
    vals = [float(v) for v in values]
    if not vals:
        return None, None, None
    lo, hi = bootstrap_interval(lambda idx: sum(vals[i] for i in idx) / len(idx), len(vals), s.n_boot,
                                seed=s.seed)
    return sum(vals) / len(vals), lo, hi


class Verifier:
    """Runs the checks on a loaded model; `judge([(topic, text)]) -> verdicts` (None: no judge)."""

    def __init__(self, lm, settings: CheckSettings, judge: Callable | None):
        self.lm, self.s, self.judge = lm, settings, judge
        self._memo: dict = {}
        self._verdicts: dict = {}   # (topic, text) -> bool | None; PairItem -> 'A' | 'B' | None
        self._pending: list = []    # (questions, future of their replies, set of them) asked with wait=False
        self.judge_wait_s = 0.0     # seconds the caller waited for judge replies

    # ---- conditions (batched: every row of every request in shared generate / forward calls) ----
    def answers_many(self, reqs: list[tuple[list[list[int]], list[str], Intervention | None]]) -> list[Answers]:
        """Answers of each (prompts, langs, intervention) request; rows carry their own edits (`PerRow`)."""
        prompts = [p for ps, _, _ in reqs for p in ps]
        langs = [x for _, ls, _ in reqs for x in ls]
        ivs = [iv for ps, _, iv in reqs for _ in ps]
        if not prompts:
            return [Answers([], [], [], [], torch.zeros(0)) for _ in reqs]
        # one generate per batch: answers, the next-token distribution and (from the same prompt cache)
        # the refusal openings' log-probs
        g = generate_full(self.lm, prompts, self.s.max_new_tokens, self.s.batch_size, ivs=ivs,
                          continuations=opening_ids(self.lm.tokenizer, langs, self._memo))
        ids, lp = g.ids, from_opening_logprobs(g.continuations)
        texts = [self.lm.tokenizer.decode(a, skip_special_tokens=True) for a in ids]
        out, k = [], 0
        for ps, _, _ in reqs:
            sl = slice(k, k + len(ps))
            out.append(Answers(ids[sl], texts[sl], lp[sl], [is_refusal(t) for t in texts[sl]], g.first[sl]))
            k += len(ps)
        return out

    def answers(self, prompts: list[list[int]], langs: list[str], iv: Intervention | None = None) -> Answers:
        return self.answers_many([(prompts, langs, iv)])[0]

    def next_logprobs_many(self, reqs: list[tuple[list[list[int]], Intervention | None]]) -> list[torch.Tensor]:
        prompts = [p for ps, _ in reqs for p in ps]
        if not prompts:
            return [torch.zeros(0) for _ in reqs]
        lp = next_token_logprobs(self.lm, prompts, self.s.batch_size, ivs=[iv for ps, iv in reqs for _ in ps])
        return list(lp.split([len(ps) for ps, _ in reqs]))

    def next_logprobs(self, prompts: list[list[int]], iv: Intervention | None = None) -> torch.Tensor:
        return self.next_logprobs_many([(prompts, iv)])[0]

    def baselines(self, sets: list[QuerySet]) -> None:
        """The unmodified answers and next-token log-probs of the query sets that lack them, in one batch."""
        todo = [qs for qs in sets if qs.base_concept is None]
        if not todo:
            return
        ans = self.answers_many([r for qs in todo for r in ((qs.concept, qs.langs, None), (qs.neutral, qs.nlangs, None),
                                                            (qs.scan, qs.scan_langs, None))])
        for k, qs in enumerate(todo):
            qs.base_concept, qs.base_neutral, qs.base_scan = ans[3 * k], ans[3 * k + 1], ans[3 * k + 2]
            qs.base_next = qs.base_neutral.first

    def baseline(self, qs: QuerySet) -> QuerySet:
        self.baselines([qs])
        return qs

    def prejudge(self, items: list, wait: bool = True) -> None:
        """Ask the judge every question ((topic, text) or `PairItem`) not yet asked, in one concurrent batch.
        `wait=False` with a judge that has `submit` (`overlap.BackgroundJudge`): ask and return at once; a later
        call that waits collects the replies of the earlier requests that hold its questions (and only those:
        a wave's records do not wait for the next wave's questions)."""
        if self.judge is None:
            return
        t0 = time.perf_counter()
        need = set(items)
        if wait:
            for entry in [e for e in self._pending if need & e[2] or e[1].done()]:
                self._pending.remove(entry)
                for it, v in zip(entry[0], self._result(entry[1])):
                    self._verdicts[it] = v
        asked = set().union(*(e[2] for e in self._pending)) if self._pending else set()
        todo = list(dict.fromkeys(it for it in items if it not in self._verdicts and it not in asked))
        if todo and not wait and hasattr(self.judge, "submit"):
            self._pending.append((todo, self.judge.submit(todo), set(todo)))
        elif todo:
            for it, v in zip(todo, self.judge(todo)):
                self._verdicts[it] = v
        self.judge_wait_s += time.perf_counter() - t0

    def _result(self, fut):
        """A pending judge reply, waited for through the judge when it can lend its threads meanwhile."""
        wait = getattr(self.judge, "wait", None)
        return wait(fut) if wait is not None else fut.result()

    def _judged(self, qs: QuerySet, topic: str, texts: list[str]) -> tuple[list[float], int, list[float | None]]:
        """Per text: the verdict (1.0: p_yes > 0.5), how many replies were unusable, and p_yes itself."""
        self.prejudge([(topic, t) for t in texts])
        p = [self._verdicts[(topic, t)] for t in texts]
        return [1.0 if v is not None and v > 0.5 else 0.0 for v in p], sum(v is None for v in p), p

    # ---- the checks ----------------------------------------------------------------------
    def direct_logits(self, direction: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """Direct logit effect of a residual-space direction: unembedding (through the final norm's gain)."""
        model = self.lm.model
        W_U = model.get_output_embeddings().weight.detach().float()
        norm = getattr(getattr(model, "model", model), "norm", None)
        v = direction.detach().float().to(W_U.device)
        if norm is not None and getattr(norm, "weight", None) is not None:
            v = v * norm.weight.detach().float()
        dla = (W_U @ v).cpu()
        k = min(self.s.top_tokens, dla.numel())
        tok = self.lm.tokenizer
        up = [[tok.decode([int(i)]), round(float(dla[i]), 4), int(i)] for i in dla.topk(k).indices]
        down = [[tok.decode([int(i)]), round(float(dla[i]), 4), int(i)] for i in (-dla).topk(k).indices]
        return dla, up, down

    def output_effect(self, base: dict, direction: torch.Tensor, steered: torch.Tensor, qs: QuerySet) -> list[Effect]:
        """`steered`: [n_neutral, vocab] next-token log-probs of the neutral queries with the direction added."""
        dla, up, down = self.direct_logits(direction)
        out = [Effect(**base, check="output_effect", metric="direct_logit_max", value=float(dla.max()),
                      n=int(dla.numel()), details={"promoted": up, "suppressed": down})]
        ids = torch.tensor([t[2] for t in up])
        change = (steered[:, ids] - qs.base_next[:, ids]).mean(1).tolist()
        m, lo, hi = mean_ci(change, self.s)
        out.append(Effect(**base, check="output_effect", metric="promoted_logprob_change", value=m, ci_low=lo,
                          ci_high=hi, n=len(change), details={"tokens": [t[0] for t in up]}))
        kl = (qs.base_next.exp() * (qs.base_next - steered)).sum(1).tolist()
        m, lo, hi = mean_ci(kl, self.s)
        out.append(Effect(**base, check="output_effect", metric="next_token_kl", value=m, ci_low=lo, ci_high=hi,
                          n=len(kl)))
        return out

    def segment_loss(self, base: dict, per_seg: list[float], tried: int) -> list[Effect]:
        """Mean over segments of the next-token loss change where the latent fires (ablated - unmodified)."""
        m, lo, hi = mean_ci(per_seg, self.s)
        return [Effect(**base, check="necessity", metric="segment_loss_change", value=m, ci_low=lo, ci_high=hi,
                       n=len(per_seg), details={"segments_tried": tried})]

    def necessity_answers(self, base: dict, ablated: Answers, qs: QuerySet, fires: list[bool] | None) -> list[Effect]:
        changed = [1.0 if a != b else 0.0 for a, b in zip(ablated.ids, qs.base_concept.ids)]
        m, lo, hi = mean_ci(changed, self.s)
        details = {"examples": [{"base": b, "ablated": a} for a, b in zip(ablated.texts[:3], qs.base_concept.texts)]}
        if fires is not None:
            details["fires_on_query"] = sum(fires) / max(len(fires), 1)
        return [Effect(**base, check="necessity", metric="answer_changed", value=m, ci_low=lo, ci_high=hi,
                       n=len(changed), details=details)]

    def judge_items(self, topic: str, steered: Answers, qs: QuerySet, control: Answers | None,
                    more: list[Answers] = ()) -> list:
        """Every judge question the sufficiency check of one direction will ask (for one batch per wave);
        `more`: the answers under further random control latents (judged absolutely only)."""
        if self.judge is None or not topic:
            return []
        items = []
        if "absolute" in self.s.judge_modes:
            for a in (qs.base_neutral, steered, control, *more):
                if a is not None:
                    items += [(topic, x) for x in a.texts]
        if "paired" in self.s.judge_modes:
            for other in (control, qs.base_neutral):
                if other is not None:
                    for x, y in zip(steered.texts, other.texts):
                        if x != y:
                            items += [PairItem(topic, x, y, True), PairItem(topic, x, y, False)]
        return items

    def paired(self, base: dict, topic: str, steered: Answers, other: Answers, tag: str) -> Effect:
        """`paired_win_vs_<tag>`: per query 1 when the judge prefers the steered answer over the other
        condition's (asked in both orders, position bias removed: `judge.debiased`), 0 when it prefers the
        other, 0.5 for equal answers or an unusable reply; the mean, above 0.5 = on-concept."""
        pairs = [(x, y) for x, y in zip(steered.texts, other.texts)]
        self.prejudge([PairItem(topic, x, y, f) for x, y in pairs if x != y for f in (True, False)])
        scores, prefs, biases, wins, losses, ties, bad, first = [], [], [], 0, 0, 0, 0, 0
        for x, y in pairs:
            if x == y:
                ties += 1
                scores.append(0.5)
                continue
            d1, d2 = self._verdicts.get(PairItem(topic, x, y, True)), self._verdicts.get(PairItem(topic, x, y, False))
            if d1 is None or d2 is None:
                bad += 1
                scores.append(0.5)
                continue
            pref, bias = debiased(d1, d2)
            prefs.append(pref)
            biases.append(bias)
            first += (d1 > 0) + (d2 > 0)
            if pref == 0:
                ties += 1
                scores.append(0.5)
            else:
                wins, losses = wins + (pref > 0), losses + (pref < 0)
                scores.append(1.0 if pref > 0 else 0.0)
        m, lo, hi = mean_ci(scores, self.s)
        asked = len(prefs)
        return Effect(**base, check="sufficiency", metric=f"paired_win_vs_{tag}", value=m, ci_low=lo, ci_high=hi,
                      n=len(scores), details={
                          "topic": topic, "wins": wins, "losses": losses, "ties": ties, "unparsed": bad,
                          "mean_preference": round(sum(prefs) / asked, 4) if asked else None,
                          "position_bias": round(sum(biases) / asked, 4) if asked else None,
                          "first_chosen": first / (2 * asked) if asked else None,
                          "sign_test_p": round(sign_test_p(wins, losses), 6), "examples": steered.texts[:3]})

    def sufficiency(self, base: dict, topic: str, steered: Answers, qs: QuerySet,
                    control: Answers | None, control_base: dict | None,
                    more: list[tuple[Answers, dict]] = ()) -> list[Effect]:
        """`more`: (answers, record base) of further random control latents of the same norm; the control's
        p(yes) of a query is then the mean over all of them (absolute mode; the paired mode uses the first)."""
        if self.judge is None or not topic:
            return []
        out = []
        if "paired" in self.s.judge_modes:
            if control is not None:
                out.append(self.paired(base, topic, steered, control, "random"))
            out.append(self.paired(base, topic, steered, qs.base_neutral, "unsteered"))
        if "absolute" in self.s.judge_modes:
            out += self._absolute(base, topic, steered, qs, control, control_base, list(more))
        return out

    def _absolute(self, base: dict, topic: str, steered: Answers, qs: QuerySet,
                  control: Answers | None, control_base: dict | None,
                  more: list[tuple[Answers, dict]] | None = None) -> list[Effect]:
        if topic not in qs.judged_unsteered:
            qs.judged_unsteered[topic] = self._judged(qs, topic, qs.base_neutral.texts)
        un, _, un_p = qs.judged_unsteered[topic]
        st, st_bad, st_p = self._judged(qs, topic, steered.texts)
        m, lo, hi = mean_ci(st, self.s)
        det = {"topic": topic, "unsteered_rate": sum(un) / max(len(un), 1), "unparsed": st_bad,
               "examples": steered.texts[:3]}
        out = []
        det["p_yes"], det["unsteered_p_yes"] = _rounded(st_p), _rounded(un_p)   # per query, for re-analysis
        diffs = {"on_concept_vs_unsteered": [a - b for a, b in zip(st, un)],
                 "p_yes_vs_unsteered": _diffs(st_p, un_p),
                 "p_yes_logodds_vs_unsteered": logodds_diffs(st_p, un_p)}
        if control is not None:
            per = []     # per control latent: its verdicts and p_yes
            for ans, cb in [(control, control_base), *(more or [])]:
                ct, ct_bad, ct_p = self._judged(qs, topic, ans.texts)
                per.append((ct, ct_p))
                cm, clo, chi = mean_ci(ct, self.s)
                out.append(Effect(**cb, check="sufficiency", metric="on_concept_rate", value=cm, ci_low=clo,
                                  ci_high=chi, n=len(ct), details={"topic": topic, "unparsed": ct_bad,
                                                                   "examples": ans.texts[:3], "p_yes": _rounded(ct_p)}))
            if len(per) > 1:   # the control of a query: the mean over the random latents
                ct = [sum(c[q] for c, _ in per) / len(per) for q in range(len(per[0][0]))]
                ct_p = [None if any(p[q] is None for _, p in per) else sum(p[q] for _, p in per) / len(per)
                        for q in range(len(per[0][1]))]
                det["random_latents"], det["random_p_yes"] = len(per), _rounded(ct_p)
            else:
                ct, ct_p = per[0]
            det["random_rate"] = sum(ct) / max(len(ct), 1)
            diffs["on_concept_vs_random"] = [a - b for a, b in zip(st, ct)]
            diffs["p_yes_vs_random"] = _diffs(st_p, ct_p)
            diffs["p_yes_logodds_vs_random"] = logodds_diffs(st_p, ct_p)
        out.insert(0, Effect(**base, check="sufficiency", metric="on_concept_rate", value=m, ci_low=lo, ci_high=hi,
                             n=len(st), details=det))
        for metric, vals in diffs.items():
            dm, dlo, dhi = mean_ci(vals, self.s)
            extra = {}
            if metric.startswith("p_yes_logodds"):   # the pre-registered statistic (stats.py), a t interval beside
                tlo, thi = t_interval(vals)
                extra = {"t_low": tlo, "t_high": thi, "on_concept": None if dlo is None else bool(dlo > 0)}
            out.append(Effect(**base, check="sufficiency", metric=metric, value=dm, ci_low=dlo, ci_high=dhi,
                              n=len(vals), details=extra))
        # the graded forced choice: on how many queries the steered answer has the higher p_yes
        others = [("unsteered", un_p)] + ([("random", ct_p)] if control is not None else [])
        for tag, other_p in others:
            scores, w, l_, t = _wins(st_p, other_p)
            wm, wlo, whi = mean_ci(scores, self.s)
            out.append(Effect(**base, check="sufficiency", metric=f"p_yes_win_vs_{tag}", value=wm, ci_low=wlo,
                              ci_high=whi, n=len(scores), details={"topic": topic, "wins": w, "losses": l_, "ties": t,
                                                                   "sign_test_p": round(sign_test_p(w, l_), 6)}))
        return out

    def refusal(self, base: dict, kind: str, changed: Answers, ref: Answers, langs: list[str]) -> list[Effect]:
        """Refusal figures of `changed` minus `ref` (kind: ablate | steer), overall and per language."""
        out = []
        groups = {None: list(range(len(langs)))}
        for i, lang in enumerate(langs):
            groups.setdefault(lang, []).append(i)
        for lang, idx in groups.items():
            lp = [changed.refusal_lp[i] - ref.refusal_lp[i] for i in idx]
            rate = [float(changed.refused[i]) - float(ref.refused[i]) for i in idx]
            for metric, vals, det in (
                    (f"refusal_logprob_change_{kind}", lp,
                     {"base_mean": sum(ref.refusal_lp[i] for i in idx) / len(idx)}),
                    (f"refusal_rate_change_{kind}", rate,
                     {"base_rate": sum(ref.refused[i] for i in idx) / len(idx),
                      "rate": sum(changed.refused[i] for i in idx) / len(idx)})):
                m, lo, hi = mean_ci(vals, self.s)
                out.append(Effect(**{**base, "lang": lang}, check="refusal", metric=metric, value=m, ci_low=lo,
                                  ci_high=hi, n=len(vals), details=det))
        return out


def _wins(a: list[float | None], b: list[float | None]) -> tuple[list[float], int, int, int]:
    """Per pair 1.0 (a higher), 0.0 (b higher) or 0.5 (equal); pairs with an unusable reply left out."""
    scores = [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(a, b) if x is not None and y is not None]
    return scores, scores.count(1.0), scores.count(0.0), scores.count(0.5)


def _rounded(p: list[float | None]) -> list[float | None]:
    return [None if x is None else round(float(x), 6) for x in p]


def _diffs(a: list[float | None], b: list[float | None]) -> list[float]:
    """Paired differences of graded judgements, pairs with an unusable reply left out."""
    return [x - y for x, y in zip(a, b) if x is not None and y is not None]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
