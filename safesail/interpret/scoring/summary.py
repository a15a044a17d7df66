"""The score stage's summary: per scorer, the values, the controls, the own-beats-shuffled rate, the cost.

`summarize(records)` gives the figures stored in stages/score.json; `summary_lines`
writes them for the run summary, with a plain warning when the explainer is too weak
(its explanations beat another latent's in fewer than `min_beats_rate` of the latents).
"""

from __future__ import annotations

import statistics
from collections import Counter

from safesail.domains import SCORE_CUT
from safesail.interpret.scoring.records import ScoreRecord

INCLUSION_CUT = SCORE_CUT  # Safe-SAIL keeps explanations whose simulation score is at least this


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _kind_summary(recs: list[ScoreRecord]) -> dict:
    ok = [r for r in recs if r.ok]
    compared = [r for r in recs if r.beats_shuffled is not None]
    ctrl_calls = [sum(int((c or {}).get("llm_calls") or 0) for c in (r.details.get("controls") or {}).values())
                  for r in recs]
    out = {"latents": len(recs), "scored": len(ok), "failed": len(recs) - len(ok),
           "failures": dict(Counter(r.failure_code for r in recs if not r.ok)),
           "mean": _mean([r.value for r in ok]),
           "median": statistics.median([r.value for r in ok]) if ok else None,
           "mean_shuffled": _mean([r.control_shuffled for r in ok]),
           "mean_constant": _mean([r.control_constant for r in ok]),
           "beats_shuffled": sum(1 for r in compared if r.beats_shuffled), "compared": len(compared),
           "beats_shuffled_rate": (sum(1 for r in compared if r.beats_shuffled) / len(compared)) if compared else None,
           "calls_per_latent": _mean([r.llm_calls for r in recs]) if recs else None,
           "prompt_tokens_per_latent": _mean([r.prompt_tokens for r in recs]) if recs else None,
           "completion_tokens_per_latent": _mean([r.completion_tokens for r in recs]) if recs else None,
           "control_calls_per_latent": _mean(ctrl_calls) if recs else None}
    if recs and recs[0].kind == "simulation":
        out[f"pass_{INCLUSION_CUT}"] = sum(1 for r in ok if r.value >= INCLUSION_CUT)
    return out


def summarize(records: list[ScoreRecord], min_beats_rate: float = 0.8) -> dict:
    kinds: dict[str, list[ScoreRecord]] = {}
    for r in records:
        kinds.setdefault(r.kind, []).append(r)
    per = {k: _kind_summary(v) for k, v in sorted(kinds.items())}
    warnings = []
    for k, s in per.items():
        rate = s["beats_shuffled_rate"]
        if rate is not None and rate < min_beats_rate:
            warnings.append(f"the explainer is too weak for {k}: its explanation beats another latent's in only "
                            f"{s['beats_shuffled']} of {s['compared']} latents ({rate:.0%}, below "
                            f"{min_beats_rate:.0%}), so these scores and the tags say little")
    return {"kinds": per, "warnings": warnings, "min_beats_rate": min_beats_rate}


def _f(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_lines(summary: dict) -> list[str]:
    lines = []
    for k, s in (summary.get("kinds") or {}).items():
        rate = s.get("beats_shuffled_rate")
        lines.append(f"  {k:<10} scored {s['scored']} of {s['latents']}; mean {_f(s['mean'])} vs shuffled "
                     f"{_f(s['mean_shuffled'])}, constant {_f(s['mean_constant'])}; own beats shuffled in "
                     f"{s['beats_shuffled']} of {s['compared']}" + (f" ({rate:.0%})" if rate is not None else "")
                     + f"; {_f(s['calls_per_latent'], '.1f')} calls and {_f(s['prompt_tokens_per_latent'], '.0f')} "
                     f"prompt tokens per latent (+{_f(s['control_calls_per_latent'], '.1f')} for controls)")
    lines += [f"  WARNING: {w}." for w in summary.get("warnings") or []]
    return lines
