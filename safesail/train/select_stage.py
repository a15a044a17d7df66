"""`safesail select`: choose the SAE per hook point whose latents best separate safety concepts.

Steps: load and check the pairs file; find the sweep's SAEs (refusing SAEs of another
model); run every pair query through the model once; per SAE, compute the
concept-contrastive figures (safesail.train.contrastive) and cache them; pick per hook
the eligible SAE (train-metric guardrails) with the best criterion, or the override;
write selection.json, the chosen SAEs' pair statistics, a table and a plot.

Resumable: each SAE's figures are kept under selection/saes/ with a fingerprint, so a
killed run re-does only the SAEs it had not finished; a finished run is skipped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from safesail.config_types import SelectConfig, load_group
from safesail.errors import UserError
from safesail.rundir import RunDir, fingerprint
from safesail.train import contrastive as C
from safesail.train import selection as S
from safesail.rundir import file_sha256
from safesail.train.pairs import DOMAINS, Pair, load_pairs, resolve_pairs_path

log = logging.getLogger(__name__)

STAGE = "select"
RESULT_VERSION = 2   # 2: with the swapped-word figures (contrastive.py)


# ---- settings ----------------------------------------------------------------------

@dataclass
class SelectSettings(SelectConfig):
    """select.*: types in config_types.SelectConfig, defaults in configs/select/default.yaml."""

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "SelectSettings":
        raw = cfg.get("select") or {}
        raw = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else dict(raw)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"select.{unknown[0]} is not a setting of the select stage; see "
                            "configs/select/default.yaml for the valid ones.")
        s = load_group(OmegaConf.create(raw), cls, "select")
        s.override = {str(k): str(v) for k, v in (s.override or {}).items()}
        s.t_grid = sorted({float(t) for t in s.t_grid} | ({float(s.criterion_t)} if s.criterion == "l0" else set()))
        if s.candidate_rank not in C.RANKS:
            raise UserError(f"select.candidate_rank={s.candidate_rank!r} is unknown; use {' or '.join(C.RANKS)}.")
        if s.criterion not in ("i_cdf", "l0"):
            raise UserError(f"select.criterion={s.criterion!r} is unknown; use i_cdf or l0.")
        if not 0 <= float(s.fire_threshold) < 1:
            raise UserError(f"select.fire_threshold={s.fire_threshold} is outside [0, 1); it is a fraction of "
                            "each latent's largest activation on the pairs, e.g. 0.2.")
        if any(not 0 < t <= 1 for t in s.t_grid) or not s.t_grid:
            raise UserError("select.t_grid must list thresholds in (0, 1], e.g. [0.05, 0.1, 0.2, 0.3, 0.5].")
        return s

    @classmethod
    def defaults(cls, **changes) -> "SelectSettings":
        """configs/select/default.yaml with `changes` applied (library callers and tests)."""
        from safesail.config import CONFIG_DIR

        raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "select" / "default.yaml"), resolve=True)
        return cls.from_cfg(OmegaConf.create({"select": {**raw, **changes}}))

    def metric_key(self) -> dict:
        """The settings that change an SAE's figures (the per-SAE cache key)."""
        return {"fire_threshold": float(self.fire_threshold), "correct_for_chance": bool(self.correct_for_chance),
                "t_grid": self.t_grid, "domains": list(self.domains)}


# ---- SAE discovery -----------------------------------------------------------------

@dataclass
class SAEEntry:
    hook: str
    name: str
    folder: Path
    arch: str
    k: int | None
    n_latents: int
    train_metrics: dict
    signature: str


def configured_hooks(cfg: DictConfig) -> list[str]:
    from safesail.hooks import configured_hooks as hook_points_of

    return [hp.name for hp in hook_points_of(cfg)]


def _read_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    if not path.is_file():
        return {}
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; re-run `safesail train` for that SAE.") from None
    return m if isinstance(m, dict) else {}


def _signature(folder: Path) -> str:
    weights = folder / "sae.safetensors"
    parts = [file_sha256(weights) if weights.is_file() else ""]
    cfg_file = folder / "cfg.json"
    parts.append(cfg_file.read_text(encoding="utf-8") if cfg_file.is_file() else "")
    return fingerprint(parts)


def _cfg_get(obj, key, default=None):
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def discover_saes(rd: RunDir, hooks: list[str], model_name: str) -> dict[str, list[SAEEntry]]:
    """Every SAE of the sweep at the configured hooks; refuses SAEs of another model or hook."""
    from safesail.saes import list_saes, load_sae

    found: dict[str, list[SAEEntry]] = {}
    for hook in hooks:
        folders = list_saes(rd.saes(hook)) if rd.saes(hook).is_dir() else []
        if not folders:
            trained = sorted(p.name for p in rd.saes().iterdir() if p.is_dir() and list_saes(p)) \
                if rd.saes().is_dir() else []
            also = f" (SAEs exist for {', '.join(trained)}: pass sae.hooks=[{','.join(trained)}])" if trained else ""
            raise UserError(f"no SAEs found under {rd.saes(hook)}{also}; run `safesail train` first, or drop "
                            "that layer from model.layers.")
        entries = []
        for folder in sorted(Path(f) for f in folders):
            sae = load_sae(folder)
            c = sae.cfg
            sae_model = str(_cfg_get(c, "model", ""))
            if sae_model and sae_model != model_name:
                raise UserError(f"the SAE in {folder} was trained on the model {sae_model!r}, not {model_name!r}; "
                                "select the matching model config or use another run.name.")
            sae_hook = str(_cfg_get(c, "hook", hook))
            if sae_hook != hook:
                raise UserError(f"the SAE in {folder} reads the hook {sae_hook}, not {hook}; move it to "
                                f"saes/{sae_hook}/ or re-train it.")
            entries.append(SAEEntry(hook=hook, name=folder.name, folder=folder, arch=str(_cfg_get(c, "arch", "?")),
                                    k=_cfg_get(c, "k"), n_latents=int(_cfg_get(c, "n_latents")),
                                    train_metrics=_read_metrics(folder), signature=_signature(folder)))
            del sae
        found[hook] = entries
    return found


# ---- per-SAE evaluation -----------------------------------------------------------

def evaluate_sae(sae, hook_acts: torch.Tensor, query_index: torch.Tensor, n_queries: int,
                 pairs: list[Pair], settings: SelectSettings, device="cpu",
                 token_ids: torch.Tensor | None = None) -> tuple[dict, C.ContrastStats]:
    """Figures and per-latent statistics of one SAE on the pairs' activations at its hook (with the
    kept tokens' ids, also the swapped-word figures)."""
    from safesail.train.pair_activations import sae_query_max

    words = None
    if token_ids is not None:
        swapped = C.swapped_mask(query_index, token_ids, n_queries)
        qmax, qw, qs = sae_query_max(sae, hook_acts, query_index, n_queries, settings.chunk_tokens, device,
                                     masks=(swapped, ~swapped))
        words = (qw[0::2], qw[1::2], qs[0::2], qs[1::2])
    else:
        qmax = sae_query_max(sae, hook_acts, query_index, n_queries, settings.chunk_tokens, device)
    cmax, nmax = qmax[0::2], qmax[1::2]
    scale = C.latent_scale(cmax, nmax)
    domains = [p.domain for p in pairs]
    stats = C.contrast_stats(cmax, nmax, domains, settings.fire_threshold, settings.correct_for_chance,
                             scale=scale, domain_order=list(DOMAINS), words=words)
    figures = C.sae_figures(stats, settings.t_grid)
    langs = [p.lang for p in pairs]
    by_lang = C.contrast_stats(cmax, nmax, langs, settings.fire_threshold, settings.correct_for_chance,
                               scale=scale)
    figures["by_lang"] = {g: {"n_pairs": by_lang.n_pairs[g], "i_cdf": C.i_cdf(by_lang.freq[g]),
                              "l0": C.l0_t(by_lang.freq[g], settings.t_grid)} for g in by_lang.domains}
    fired = (qmax > 0)
    figures["pair_query_l0"] = float(fired.float().sum(1).mean())       # latents active per query
    figures["latents_active_on_pairs"] = int(fired.any(0).sum())
    return figures, stats


def criterion_value(figures: dict, settings: SelectSettings) -> float:
    macro = figures.get("macro") or figures[C.ALL]
    if settings.criterion == "l0":
        return float(macro["l0"][C.t_key(settings.criterion_t)])
    return float(macro["i_cdf"])


def guardrail(entry: SAEEntry, settings: SelectSettings) -> str | None:
    """None when the SAE is eligible, else why not (one phrase)."""
    m = entry.train_metrics
    fvu, ce = m.get("fvu"), m.get("ce_loss_recovered")
    if settings.max_fvu is not None and fvu is not None and float(fvu) > float(settings.max_fvu):
        return f"FVU {float(fvu):.3f} above select.max_fvu={settings.max_fvu}"
    if settings.min_ce_loss_recovered is not None and ce is not None \
            and float(ce) < float(settings.min_ce_loss_recovered):
        return f"CE-loss recovered {float(ce):.3f} below select.min_ce_loss_recovered={settings.min_ce_loss_recovered}"
    return None


def choose(hook: str, records: list[dict], settings: SelectSettings) -> dict:
    """The chosen SAE at a hook and why: the override, else the eligible SAE with the best criterion."""
    by_name = {r["name"]: r for r in records}
    crit = "I_CDF" if settings.criterion == "i_cdf" else f"L0,t (t={settings.criterion_t:g})"
    if hook in settings.override:
        name = settings.override[hook]
        if name not in by_name:
            raise UserError(f"select.override picks {name!r} at {hook}, but the sweep there holds only "
                            f"{', '.join(sorted(by_name))}; name one of those.")
        r = by_name[name]
        note = "" if r["eligible"] else f" (despite the guardrail: {r['ineligible_reason']})"
        return {"sae": name, "dir": r["dir"], "score": r["score"], "override": True,
                "reason": f"user override select.override.{hook}={name}{note}"}
    eligible = [r for r in records if r["eligible"]]
    if not eligible:
        worst = "; ".join(f"{r['name']}: {r['ineligible_reason']}" for r in records)
        raise UserError(f"no SAE at {hook} passes the guardrails ({worst}); train longer, or relax "
                        "select.max_fvu / select.min_ce_loss_recovered, or set select.override.")
    ranked = sorted(eligible, key=lambda r: (-r["score"], r["train_metrics"].get("fvu", float("inf")), r["name"]))
    best = ranked[0]
    reason = f"highest {crit} ({best['score']:.4g}) of {len(eligible)} eligible SAE(s) at {hook}"
    if len(ranked) > 1:
        reason += f"; runner-up {ranked[1]['name']} ({ranked[1]['score']:.4g})"
    n_out = len(records) - len(eligible)
    if n_out:
        reason += f"; {n_out} excluded by the guardrails"
    return {"sae": best["name"], "dir": best["dir"], "score": best["score"], "override": False, "reason": reason}


def candidates_for(stats: C.ContrastStats, settings: SelectSettings) -> dict[str, list[dict]]:
    return {g: C.top_latents(stats, g, settings.candidates_per_domain, settings.candidate_min_freq,
                             settings.candidate_rank) for g in stats.groups}


# ---- the stage -------------------------------------------------------------------

def _load_result(paths: tuple[Path, Path], key: str) -> tuple[dict, C.ContrastStats] | None:
    from safetensors.torch import load_file

    fig_path, ten_path = paths
    if not (fig_path.is_file() and ten_path.is_file()):
        return None
    try:
        rec = json.loads(fig_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    if rec.get("key") != key or rec.get("version") != RESULT_VERSION:
        return None
    stats = C.stats_from_tensors(load_file(str(ten_path)))
    stats.n_pairs = {g: int(v) for g, v in rec["n_pairs"].items()}
    return rec["figures"], stats


def _save_result(paths: tuple[Path, Path], key: str, figures: dict, stats: C.ContrastStats) -> None:
    from safesail.rundir import atomic_write_json

    fig_path, ten_path = paths
    S.save_tensors(ten_path, C.stats_tensors(stats))
    atomic_write_json(fig_path, {"version": RESULT_VERSION, "key": key, "n_pairs": stats.n_pairs,
                                 "figures": figures})


def run_select_stage(cfg: DictConfig, args: list[str]) -> None:
    if args:
        raise UserError(f"`safesail select` takes no arguments (got {args[0]!r}); set options as select.<key>=value.")
    t0 = time.perf_counter()
    settings = SelectSettings.from_cfg(cfg)
    rd = RunDir.from_cfg(cfg)
    rd.save_config(cfg)
    pairs_path = resolve_pairs_path(settings.pairs)
    pairs = load_pairs(pairs_path, settings.domains)
    pairs_sha = file_sha256(pairs_path)
    model_name = str(cfg.model.name)
    hooks = configured_hooks(cfg)
    sweep = discover_saes(rd, hooks, model_name)
    system_prompt = cfg.model.get("system_prompt")
    base_key = {"pairs": pairs_sha, "model": model_name, "system_prompt": system_prompt,
                "max_length": cfg.model.get("max_length"), **settings.metric_key()}
    fp = fingerprint({"base": base_key, "saes": {h: [(e.name, e.signature) for e in es] for h, es in sweep.items()},
                      "choice": {"criterion": settings.criterion, "criterion_t": settings.criterion_t,
                                 "max_fvu": settings.max_fvu, "min_ce": settings.min_ce_loss_recovered,
                                 "override": settings.override, "n_cand": settings.candidates_per_domain,
                                 "min_freq": settings.candidate_min_freq, "rank": settings.candidate_rank,
                                 "plot": settings.plot},
                      "metrics": {h: [e.train_metrics for e in es] for h, es in sweep.items()}})
    if rd.stage_done(STAGE, fp) and S.selection_path(rd).is_file():
        log.info("select: already done for these pairs, SAEs and settings; nothing to do")
        print(format_table(S.load_selection(rd)))
        return

    # Which SAEs still need evaluating?
    results: dict[tuple[str, str], tuple[dict, C.ContrastStats]] = {}
    todo: list[SAEEntry] = []
    for hook, entries in sweep.items():
        for e in entries:
            key = fingerprint({**base_key, "sae": e.signature})
            got = _load_result(S.sae_result_paths(rd, hook, e.name), key)
            if got is None:
                todo.append(e)
            else:
                results[(hook, e.name)] = got
    if todo:
        log.info("select: %d of %d SAE(s) to evaluate on %d pairs", len(todo),
                 sum(len(v) for v in sweep.values()), len(pairs))
        _evaluate_todo(cfg, rd, pairs, todo, settings, base_key, results)
    else:
        log.info("select: every SAE's figures are cached; recomputing the choice only")

    selection = build_selection(rd, cfg, pairs, pairs_path, pairs_sha, sweep, results, settings)
    S.write_selection(rd, selection)
    for hook, choice in selection["chosen"].items():
        stats = results[(hook, choice["sae"])][1]
        S.save_tensors(S.pair_stats_path(rd, hook), C.stats_tensors(stats),
                       metadata={"hook": hook, "sae": choice["sae"], "fire_threshold": settings.fire_threshold,
                                 "correct_for_chance": settings.correct_for_chance, "pairs_sha256": pairs_sha,
                                 "model": model_name})
    if settings.plot:
        from safesail.train.select_plot import plot_selection

        plot_selection(selection, S.plot_path(rd))
    seconds = round(time.perf_counter() - t0, 2)
    rd.mark_stage(STAGE, fp, chosen={h: c["sae"] for h, c in selection["chosen"].items()}, seconds=seconds)
    print(format_table(selection))
    print(f"selection written to {S.selection_path(rd)}" + (f" (plot: {S.plot_path(rd)})" if settings.plot else ""))


def _evaluate_todo(cfg, rd, pairs, todo, settings, base_key, results) -> None:
    from safesail.hooks import HookPoint, hook_points
    from safesail.models import load_model, resolve_device
    from safesail.train.pair_activations import capture_pair_activations
    from safesail.saes import load_sae

    device = resolve_device(cfg.get("device", "auto"))
    lm = load_model(cfg.model, device, cache_dir=cfg.get("cache_dir"))
    wanted = sorted({HookPoint.parse(e.hook) for e in todo})
    hook_points([hp.layer for hp in wanted], wanted[0].site, lm.num_layers)  # validates the layers
    pa = capture_pair_activations(lm, pairs, wanted, cfg.model.get("system_prompt"),
                                  batch_size=int(settings.batch_size), max_length=cfg.model.get("max_length"))
    del lm
    for e in tqdm(todo, desc="SAEs", unit="sae"):
        sae = load_sae(e.folder)
        d_in = int(_cfg_get(sae.cfg, "d_in", pa.acts[e.hook].shape[1]))
        if d_in != pa.acts[e.hook].shape[1]:
            raise UserError(f"the SAE in {e.folder} expects inputs of width {d_in} but {e.hook} of the model has "
                            f"{pa.acts[e.hook].shape[1]}; it was trained on another model, re-train it.")
        sae = sae.to(device).eval()
        figures, stats = evaluate_sae(sae, pa.acts[e.hook], pa.query_index, pa.n_queries, pairs, settings, device,
                                      token_ids=pa.token_ids)
        key = fingerprint({**base_key, "sae": e.signature})
        _save_result(S.sae_result_paths(rd, e.hook, e.name), key, figures, stats)
        results[(e.hook, e.name)] = (figures, stats)
        log.info("select: %s %s  I_CDF=%.4g", e.hook, e.name, figures.get("macro", figures[C.ALL])["i_cdf"])
        del sae


def build_selection(rd: RunDir, cfg: DictConfig, pairs: list[Pair], pairs_path: Path, pairs_sha: str,
                    sweep: dict[str, list[SAEEntry]], results: dict, settings: SelectSettings) -> dict:
    from collections import Counter

    records_by_hook: dict[str, list[dict]] = {}
    all_records: list[dict] = []
    for hook, entries in sweep.items():
        recs = []
        for e in entries:
            figures, _ = results[(hook, e.name)]
            why = guardrail(e, settings)
            rec = {"hook": hook, "name": e.name, "dir": str(e.folder.resolve().relative_to(rd.root.resolve()))
                   if e.folder.resolve().is_relative_to(rd.root.resolve()) else str(e.folder),
                   "arch": e.arch, "k": e.k, "n_latents": e.n_latents,
                   "train_metrics": {k: e.train_metrics.get(k) for k in
                                     ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_to_clean")
                                     if k in e.train_metrics},
                   "eligible": why is None, "ineligible_reason": why,
                   "score": criterion_value(figures, settings), "figures": figures}
            recs.append(rec)
        records_by_hook[hook] = recs
        all_records += recs
    chosen = {hook: choose(hook, recs, settings) for hook, recs in records_by_hook.items()}
    for hook, recs in records_by_hook.items():
        for r in recs:
            r["chosen"] = r["name"] == chosen[hook]["sae"]
    candidates = {}
    candidate_ids = {}
    for hook, c in chosen.items():
        stats = results[(hook, c["sae"])][1]
        cands = candidates_for(stats, settings)
        candidates[hook] = cands
        candidate_ids[hook] = sorted({x["latent"] for lst in cands.values() for x in lst})
    return {
        "model": str(cfg.model.name),
        "pairs": {"path": str(pairs_path), "sha256": pairs_sha, "n_pairs": len(pairs),
                  "by_domain": dict(Counter(p.domain for p in pairs)), "by_lang": dict(Counter(p.lang for p in pairs))},
        "settings": {"fire_threshold": settings.fire_threshold, "correct_for_chance": settings.correct_for_chance,
                     "t_grid": settings.t_grid, "criterion": settings.criterion, "criterion_t": settings.criterion_t,
                     "max_fvu": settings.max_fvu, "min_ce_loss_recovered": settings.min_ce_loss_recovered,
                     "candidates_per_domain": settings.candidates_per_domain,
                     "candidate_min_freq": settings.candidate_min_freq, "candidate_rank": settings.candidate_rank,
                     "override": settings.override},
        "saes": all_records,
        "chosen": chosen,
        "candidates": candidates,
        "candidate_latents": candidate_ids,
    }


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(float(v), spec)


def format_table(selection: dict) -> str:
    """The end-of-stage table: one row per SAE, the chosen ones starred."""
    t_grid = selection["settings"]["t_grid"]
    shown_t = [C.t_key(t) for t in t_grid][:3]
    doms = [d for d in DOMAINS if d in selection["pairs"]["by_domain"]]
    head = (["hook", "sae", "k", "latents", "FVU", "CE rec", "I_CDF"] + [f"L0,{t}" for t in shown_t]
            + [f"I_CDF {d[:4]}" for d in doms] + ["ok", "chosen"])
    rows = []
    for r in selection["saes"]:
        macro = r["figures"].get("macro") or r["figures"][C.ALL]
        tm = r["train_metrics"]
        rows.append([r["hook"], r["name"], str(r["k"]), str(r["n_latents"]), _fmt(tm.get("fvu")),
                     _fmt(tm.get("ce_loss_recovered")), _fmt(macro["i_cdf"], ".4f")]
                    + [_fmt(macro["l0"][t], ".1f") for t in shown_t]
                    + [_fmt(r["figures"][d]["i_cdf"], ".4f") if d in r["figures"] else "-" for d in doms]
                    + ["yes" if r["eligible"] else "no", "*" if r.get("chosen") else ""])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append("")
    for hook, c in selection["chosen"].items():
        n = len(selection["candidate_latents"].get(hook, []))
        lines.append(f"{hook}: {c['sae']} ({c['reason']}); {n} candidate latents")
    return "\n".join(lines)
