"""`safesail diagnose`: the per-token safety latents of a query (and its answer) in the terminal.

    safesail diagnose "How do I pick a lock?"
    safesail diagnose --json "How do I pick a lock?"              # the API's DiagnoseResponse
    safesail diagnose --lang-compare "How do I..." "我如何..." --langs en,zh
    safesail diagnose --top 3 --domain violence --min-norm 0.5 "..."
    safesail diagnose --ablate 14_3598 --add 7_850=4 "..."        # original and steered answers side by side
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from safesail.diagnose.schemas import DOMAINS, CompareResponse, DiagnoseResponse, Filters
from safesail.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}; see `safesail diagnose --help`.")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="safesail diagnose", description="Print the safety latents firing on every token of a "
                                                       "query and of the model's answer.")
    p.add_argument("query", nargs="+", help="the query (words are joined); with --lang-compare, one query per language")
    p.add_argument("--json", action="store_true", help="print the JSON response (the API's schema) instead of a table")
    p.add_argument("--lang-compare", action="store_true", help="compare the same query in 2-3 languages")
    p.add_argument("--langs", default="en,zh,hi", help="language codes of the --lang-compare queries, in order")
    p.add_argument("--scope", choices=("all", "query", "answer"), default="all", help="tokens counted by --lang-compare")
    p.add_argument("--answer", help="diagnose this answer instead of generating one")
    p.add_argument("--max-new-tokens", type=int, help="answer length (default diagnose.max_new_tokens)")
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    p.add_argument("--top", type=int, default=5, help="latents shown per token (default 5)")
    p.add_argument("--domain", action="append", choices=DOMAINS, default=[], help="keep latents of this domain (repeatable)")
    p.add_argument("--min-score", type=float, help="keep latents whose explanation score is at least this")
    p.add_argument("--score-kind", default="simulation",
                   help="the scorer --min-score applies to (simulation, detection, fuzzing; default simulation)")
    p.add_argument("--min-norm", type=float, default=0.0, help="keep latents above this normalized activation")
    p.add_argument("--all-tokens", action="store_true", help="also list tokens of the system prompt and template")
    p.add_argument("--ablate", action="append", default=[], metavar="L_I",
                   help="ablate latent L_I (its contribution removed, the SAE error kept); repeatable")
    p.add_argument("--clamp", action="append", default=[], metavar="L_I=V",
                   help="clamp latent L_I to normalized activation V; repeatable")
    p.add_argument("--add", action="append", default=[], metavar="L_I=A",
                   help="add A times the latent's 0.999-quantile activation along its decoder direction; repeatable")
    return p


def _clip(text: str | None, n: int) -> str:
    text = "(no explanation)" if text is None else " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def format_table(resp: DiagnoseResponse, all_tokens: bool = False) -> str:
    """The per-token table: one block per token that has latents."""
    width = shutil.get_terminal_size((120, 24)).columns
    lines = [f"query : {resp.query}", f"answer: {resp.answer}" + ("  [cut at the limit]" if resp.truncated else ""), ""]
    lines.append(f"{'pos':>4} {'role':<6} {'token':<14} {'neuron':<10} {'norm':>6} {'score':>5} {'tags':<18} explanation")
    for t in resp.tokens:
        if not all_tokens and t.role not in ("query", "answer"):
            continue
        if t.special:
            continue
        tok = repr(t.text)[1:-1][:14]
        if not t.latents:
            lines.append(f"{t.position:>4} {t.role:<6} {tok:<14} {'-':<10}")
            continue
        for j, h in enumerate(t.latents):
            head = f"{t.position:>4} {t.role:<6} {tok:<14}" if j == 0 else " " * 26
            score = "-" if h.score is None else f"{h.score:.2f}"
            tags = ",".join(h.tags) or "general"
            row = f"{head} {h.neuron_id:<10} {h.norm_activation:>6.2f} {score:>5} {tags[:18]:<18} "
            lines.append(row + _clip(h.explanation, max(20, width - len(row))))
    tm = resp.timings
    lines += ["", f"time: generate {tm.generate_s:.2f}s, forward {tm.forward_s:.2f}s, SAE encode {tm.encode_s:.3f}s, "
                  f"DB lookup {tm.lookup_s:.3f}s, total {tm.total_s:.2f}s"]
    return "\n".join(lines)


def format_compare(resp: CompareResponse, top: int) -> str:
    langs = resp.languages
    lines = []
    for lang in langs:
        r = resp.results[lang]
        lines += [f"[{lang}] query : {r.query}", f"[{lang}] answer: {r.answer}"]
    lines += ["", f"{'domain':<12} {'shared':>7} " + " ".join(f"{'only ' + lang:>9}" for lang in langs)
              + (f" {'some':>6}" if len(langs) > 2 else "")]
    for d, s in resp.summary.items():
        lines.append(f"{d:<12} {s['shared']:>7} " + " ".join(f"{s[lang]:>9}" for lang in langs)
                     + (f" {s['partial']:>6}" if len(langs) > 2 else ""))
    for g in resp.groups:
        lines += ["", f"== {g.domain}, layer {g.layer}"]
        for name, lst in [("shared", g.shared)] + [(f"only {lang}", g.unique.get(lang, [])) for lang in langs]:
            for lat in lst[:top]:
                v = max(lat.max_norm.values())
                lines.append(f"  {name:<10} {lat.neuron_id:<10} {v:>6.2f}  {_clip(lat.explanation, 80)}")
    return "\n".join(lines)


def run_diagnose_stage(cfg, args: list[str]) -> None:
    from safesail.diagnose.compare import compare_annotated
    from safesail.diagnose.engine import DiagnoseEngine

    ns = parser().parse_args(args)
    filters = Filters(domains=ns.domain, min_score=ns.min_score, score_kind=ns.score_kind,
                      min_norm=max(ns.min_norm, 0.0))
    if ns.lang_compare:
        langs = [x.strip() for x in ns.langs.split(",") if x.strip()]
        if not 2 <= len(ns.query) <= 3:
            raise UserError(f"--lang-compare needs the query in 2 or 3 languages (quoted, one argument each); "
                            f"got {len(ns.query)}.")
        if len(langs) < len(ns.query):
            raise UserError(f"--langs names {len(langs)} languages for {len(ns.query)} queries; list one code per query.")
        engine = DiagnoseEngine.from_config(cfg)
        per_lang = {lang: engine.annotate(q, None, ns.max_new_tokens, ns.temperature)
                    for lang, q in zip(langs, ns.query)}
        groups, summary = compare_annotated(per_lang, ns.scope, filters)
        resp = CompareResponse(languages=list(per_lang), groups=groups, summary=summary,
                               results={lang: engine.response(a, ns.top, filters) for lang, a in per_lang.items()})
        print(resp.model_dump_json(indent=1) if ns.json else format_compare(resp, ns.top))
        return
    query = " ".join(ns.query)
    if ns.ablate or ns.clamp or ns.add:
        return _run_steer(cfg, ns, query, filters)
    engine = DiagnoseEngine.from_config(cfg)
    resp = engine.diagnose(query, ns.answer, ns.max_new_tokens, ns.temperature, ns.top, filters,
                           include_template=ns.all_tokens)
    if ns.json:
        sys.stdout.write(json.dumps(resp.model_dump(), ensure_ascii=False, indent=1) + "\n")
    else:
        print(format_table(resp, ns.all_tokens))


def _steer_request(ns, query: str, filters: Filters):
    from safesail.diagnose.steer import SteerEdit, SteerRequest
    from safesail.verify.interventions import parse_edit

    edits = []
    for mode in ("ablate", "clamp", "add"):
        for text in getattr(ns, mode):
            e = parse_edit(text, mode)
            edits.append(SteerEdit(neuron_id=e.neuron_id, mode=mode, strength=e.strength))
    return SteerRequest(query=query, edits=edits, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                        top=ns.top, filters=filters)


def format_steer(resp, all_tokens: bool = False) -> str:
    edits = ", ".join(e.neuron_id + (f" {e.mode}" if e.mode == "ablate" else f" {e.mode}={e.strength:g}")
                      for e in resp.edits)
    lines = [f"interventions: {edits}", ""]
    for name, side in (("original", resp.original), ("steered", resp.steered)):
        if side is None:
            continue
        r = side.refusal
        lines += [f"=== {name}: refusal log-prob {r.logprob:.2f}, refusal phrase {'yes' if r.refused else 'no'}",
                  format_table(side.result, all_tokens), ""]
    return "\n".join(lines)


def _run_steer(cfg, ns, query: str, filters: Filters) -> None:
    from safesail.diagnose.engine import DiagnoseEngine
    from safesail.diagnose.steer import steer

    if ns.answer:
        raise UserError("--answer cannot be combined with --ablate/--clamp/--add: steering generates both answers; "
                        "drop --answer.")
    req = _steer_request(ns, query, filters)
    engine = DiagnoseEngine.from_config(cfg)
    resp = steer(engine, req)
    if ns.json:
        sys.stdout.write(json.dumps(resp.model_dump(), ensure_ascii=False, indent=1) + "\n")
    else:
        print(format_steer(resp, ns.all_tokens))
