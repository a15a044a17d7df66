"""`safesail run`: every stage in order, each skipped when already complete.

cache -> train -> select -> collect -> explain -> score -> tag -> verify -> db build

Each stage decides for itself whether it is complete (a fingerprint of its
inputs and config in `runs/<name>/stages/<stage>.json`) and continues where it
stopped when it was interrupted. This module only orders them, times them and
prints a summary with the command that opens the diagnose page.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from omegaconf import DictConfig, OmegaConf

from safesail.interpret.scoring.records import read_scores
from safesail.interpret.scoring.summary import summarize, summary_lines
from safesail.domains import DOMAINS, SCORE_CUT
from safesail.interpret.records import read_explanations, read_tags
from safesail.process_memory import peak_rss_mib, release, rss_mib
from safesail.rundir import RunDir, atomic_write_json
from safesail.stages import PIPELINE as PIPELINE_STAGES

log = logging.getLogger(__name__)

# (stage name, the words passed to it), in order: the stages of safesail/stages.py marked in_run
PIPELINE: list[tuple[str, list[str]]] = [(s.name, list(s.run_args)) for s in PIPELINE_STAGES]


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def run_pipeline(cfg: DictConfig, args: list[str]) -> None:
    rd = RunDir.from_cfg(cfg)
    rd.save_config(cfg)
    only = None
    if args:
        only = set(args)
        unknown = only - {name for name, _ in PIPELINE}
        if unknown:
            from safesail.errors import UserError

            raise UserError(f"unknown stage(s) {sorted(unknown)} for `safesail run`; choose among "
                            f"{', '.join(n for n, _ in PIPELINE)} or give none to run all.")
    timings = []
    for stage in PIPELINE_STAGES:
        name = stage.name
        if only and name not in only:
            continue
        log.info("=== stage %s ===", name)
        t0 = time.perf_counter()
        stage.resolve()(cfg, list(stage.run_args))
        row = {"stage": name, "seconds": round(time.perf_counter() - t0, 2),
               "peak_rss_mib_so_far": round(peak_rss_mib(), 1), "rss_mib_after": _round(rss_mib())}
        release()   # hand the stage's freed heap back before the next one maps its own buffers
        row["rss_mib_after_release"] = _round(rss_mib())
        timings.append(row)
    atomic_write_json(rd.pipeline_file, {"stages": timings})
    print(summary(rd, cfg, timings))


def summary(rd: RunDir, cfg: DictConfig, timings: list[dict] | None = None) -> str:
    lines = ["", f"Safe-SAIL run `{cfg.run.name}` ({cfg.model.name}) in {rd.root}"]
    for t in timings or []:
        lines.append(f"  {t['stage']:<8} {t['seconds']:>8.1f} s   peak RSS {t['peak_rss_mib_so_far']:.0f} MiB")
    cache = rd.stage_record("cache") or {}
    tokens = (cache.get("summary") or {}).get("tokens")
    if tokens is not None:
        lines.append(f"tokens cached: {tokens:,} per hook point")
    saes = sorted(rd.saes().glob("*/*/cfg.json")) if rd.saes().exists() else []
    lines.append(f"SAEs trained: {len(saes)}")
    if rd.selection_file.exists():
        sel = json.loads(rd.selection_file.read_text())
        rows = {(r.get("hook"), r.get("name")): r for r in sel.get("saes") or []}
        for hook, info in (sel.get("chosen") or {}).items():
            row = rows.get((hook, info.get("sae"))) or {}
            m = row.get("train_metrics") or {}
            figs = [f"{key}={m[key]:.3g}" for key in ("fvu", "l0", "ce_loss_recovered") if m.get(key) is not None]
            if row.get("score") is not None:
                figs.append(f"I_CDF={row['score']:.3g}")
            lines.append(f"  {hook}: chosen {info.get('sae')}" + (f" ({', '.join(figs)})" if figs else ""))
    expl = read_explanations(rd.explanations_file)
    all_scores = read_scores(rd.scores_file)
    scores = {(h, l): r for (h, l, kind), r in all_scores.items() if kind == "simulation"}
    tags = read_tags(rd.tags_file)
    ok_expl = sum(r.status == "ok" for r in expl.values())
    ok_scores = [r for r in scores.values() if r.ok]
    cut = float(OmegaConf.select(cfg, "db.export.score_cut", default=SCORE_CUT))
    passing = {k for k, r in scores.items() if r.ok and r.value >= cut}
    lines.append(f"latents explained: {ok_expl} ok of {len(expl)}; scored by simulation: {len(ok_scores)} ok of "
                 f"{len(scores)}; pass the {cut} cut: {len(passing)}")
    score_stage = (rd.stage_record("score") or {}).get("summary") or {}
    lines += summary_lines(summarize(list(all_scores.values()), float(score_stage.get("min_beats_rate", 0.8))))
    per_domain = {d: sum(1 for k, r in tags.items() if d in r.tags and k in passing) for d in DOMAINS}
    lines.append("  passing per domain: " + ", ".join(f"{d} {n}" for d, n in per_domain.items()))
    if rd.neuron_db.exists():
        lines.append(f"neuron DB: {rd.neuron_db}")
    if rd.export.exists():
        lines.append(f"exports: {rd.export}")
    overrides = [a for a in sys.argv[1:] if "=" in a]
    lines.append("open the diagnose page with:  safesail serve " + " ".join(overrides))
    return "\n".join(lines)
