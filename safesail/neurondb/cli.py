"""`safesail db <command>`: build, export, import and query the neuron database.

    safesail db build [--force]
    safesail db export [--out DIR] [--score-cut 0.2] [--indices explained|exported|all] [--no-jsonl]
    safesail db import --from RELEASE_DIR | --en-db FILE --cn-db FILE [--indices F...] [--quantiles F...]
                       [--ckpt F...] [--model NAME] [--num-tokens N] [--lang en,cn]
    safesail db stats [--json]
    safesail db search [TEXT] [--domain D] [--min-score X] [--max-score Y] [--kind K] [--layer L] [--limit N] [--json]
    safesail db show LAYER INDEX [--hook HOOK] [--examples N] [--json]
Every command takes --db FILE (default: db.path, else runs/<name>/neurons.sqlite).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from safesail.domains import (SAFESAIL_ARCH, SAFESAIL_HOOK_SITE, SAFESAIL_K, SAFESAIL_MODEL, SAFESAIL_NUM_LAYERS,
                              SAFESAIL_NUM_TOKENS, SAFESAIL_QUANTILE, SCORE_CUT)
from safesail.errors import UserError
from safesail.rundir import RunDir, fingerprint

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see `safesail db --help`).")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="safesail db", description="build, export, import and query the neuron database")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--db", type=Path, help="the neuron DB file")
        return sp

    b = add("build", "build or update the DB from this run's outputs")
    b.add_argument("--force", action="store_true", help="re-check every input even if the stage is marked done")
    e = add("export", "write Safe-SAIL's release layout + a JSONL dump")
    e.add_argument("--out", type=Path)
    e.add_argument("--score-cut", type=float)
    e.add_argument("--indices", choices=("explained", "exported", "all"))
    e.add_argument("--no-jsonl", action="store_true")
    i = add("import", "import Safe-SAIL's released files")
    i.add_argument("--from", dest="release_dir", type=Path, help="folder holding the release files (any depth)")
    i.add_argument("--en-db", type=Path)
    i.add_argument("--cn-db", type=Path)
    i.add_argument("--indices", type=Path, nargs="+", default=[])
    i.add_argument("--quantiles", type=Path, nargs="+", default=[])
    i.add_argument("--ckpt", type=Path, nargs="+", default=[])
    i.add_argument("--model")
    i.add_argument("--num-tokens", type=int)
    i.add_argument("--lang", help="languages to import, e.g. en or en,cn (default: every neuron-DB file given "
                                  "or found; each language's explanations are kept side by side)")
    s = add("stats", "counts per layer, domain and score band")
    s.add_argument("--json", action="store_true")
    q = add("search", "search explanations by text, domain, score, layer")
    q.add_argument("text", nargs="*")
    q.add_argument("--domain")
    q.add_argument("--min-score", type=float)
    q.add_argument("--max-score", type=float)
    q.add_argument("--kind", default="simulation",
                   help="the scorer whose score --min-score/--max-score filter and the list shows "
                        "(simulation, detection, fuzzing; default simulation)")
    q.add_argument("--layer", type=int)
    q.add_argument("--limit", type=int, default=20)
    q.add_argument("--json", action="store_true")
    w = add("show", "one latent with its examples")
    w.add_argument("layer", type=int)
    w.add_argument("index", type=int)
    w.add_argument("--hook")
    w.add_argument("--examples", type=int, default=5)
    w.add_argument("--json", action="store_true")
    return p


def _db_cfg(cfg: DictConfig):
    return cfg.get("db") or {}


def db_path(cfg: DictConfig, given: Path | None) -> Path:
    if given:
        return Path(given)
    if _db_cfg(cfg).get("path"):
        return Path(_db_cfg(cfg)["path"])
    return RunDir.from_cfg(cfg, create=False).neuron_db


def run_db_command(cfg: DictConfig, args: list[str]) -> None:
    if not args:
        raise UserError("say what to do: safesail db build | export | import | stats | search | show.")
    ns = _parser().parse_args(args)
    {"build": _build, "export": _export, "import": _import, "stats": _stats, "search": _search,
     "show": _show}[ns.command](cfg, ns)


def _build(cfg: DictConfig, ns) -> None:
    from safesail.neurondb import files
    from safesail.neurondb.build import build_db, fingerprint_of, plan
    from safesail.neurondb.store import NeuronDB

    rd = RunDir.from_cfg(cfg)
    path = db_path(cfg, ns.db)
    hooks, interp = plan(cfg, rd)
    fp = fingerprint({**fingerprint_of(hooks, interp, _db_cfg(cfg)), "db": str(path)})
    if not ns.force and rd.stage_done("db", fp) and path.is_file() and files.integrity_problem(path) is None:
        NeuronDB.open(path).close()  # still a readable DB?
        log.info("neuron DB %s is up to date", path)
        return
    summary = build_db(cfg, rd, path)
    if summary.get("set_aside"):
        print(f"{path} was corrupt: kept it as {summary['set_aside']} and built a fresh DB from the run's files")
    rd.mark_stage("db", fp, db=str(path), **{k: v for k, v in summary.items()})
    print(f"neuron DB {path}: {summary['latents']} latent rows loaded, {summary['explanations']} explanations, "
          f"{summary['scores']} scores, {summary['tags']} tag records updated")


def _export(cfg: DictConfig, ns) -> None:
    from safesail.neurondb.export_safesail import export_release
    from safesail.neurondb.store import NeuronDB

    ecfg = _db_cfg(cfg).get("export") or {}
    out = ns.out or (Path(ecfg["dir"]) if ecfg.get("dir") else RunDir.from_cfg(cfg, create=False).export)
    with NeuronDB.open(db_path(cfg, ns.db)) as db:
        s = export_release(db, out, score_cut=ns.score_cut if ns.score_cut is not None else ecfg.get("score_cut", SCORE_CUT),
                           indices_mode=ns.indices or ecfg.get("indices", "explained"),
                           jsonl=not ns.no_jsonl and ecfg.get("jsonl", True))
    print(f"exported {s['entries']} entries ({s['tagged']} tagged; {', '.join(s['files'])}) and "
          f"{len(s['layers'])} layers of indices/quantiles to {out}"
          + (f", {s['verify_effects']} causal-check results" if s.get("verify_effects") else ""))


def _import_layers(cfg: DictConfig, icfg, model: str) -> int | None:
    """How many layers the release's model has: the model config's, or db.import.num_layers for its model."""
    if cfg.get("model") is not None and cfg.model.get("name") == model and cfg.model.get("num_layers"):
        return int(cfg.model.num_layers)
    if model == icfg.get("model", SAFESAIL_MODEL):
        return int(icfg.get("num_layers") or SAFESAIL_NUM_LAYERS)
    log.warning("the layer count of model %r is unknown here; layers of the imported files are not checked", model)
    return None


def _import(cfg: DictConfig, ns) -> None:
    from safesail.neurondb import import_safesail as imp

    icfg = _db_cfg(cfg).get("import") or {}
    langs = [x.strip() for x in ns.lang.split(",") if x.strip()] if ns.lang else None
    db_files = {}
    if ns.en_db:
        db_files["en"] = ns.en_db
    if ns.cn_db:
        db_files["cn"] = ns.cn_db
    indices = {imp.layer_of(p, "indices"): p for p in ns.indices}
    quantiles = {imp.layer_of(p, "quantile"): p for p in ns.quantiles}
    ckpts = {imp.layer_of(p, "ckpt"): p for p in ns.ckpt}
    if ns.release_dir:
        found = imp.find_release_files(ns.release_dir)
        for lang in ("en", "cn"):
            if found[f"{lang}_db"] is not None:
                db_files.setdefault(lang, found[f"{lang}_db"])
        indices = {**found["indices"], **indices}
        quantiles = {**found["quantile"], **quantiles}
        ckpts = {**found["ckpt"], **ckpts}
    if langs is not None:
        unknown = [x for x in langs if x not in db_files]
        if unknown:
            raise UserError(f"--lang names {', '.join(unknown)}, but no {unknown[0]}_db.json was given or found; "
                            f"pick from {', '.join(db_files) or 'none'}.")
        db_files = {k: v for k, v in db_files.items() if k in langs}
    model = ns.model or icfg.get("model", SAFESAIL_MODEL)
    rel = imp.read_release(db_files or None, indices, quantiles, ckpts, num_layers=_import_layers(cfg, icfg, model),
                           model=model)
    path = db_path(cfg, ns.db)
    s = imp.import_release(path, rel, model, cfg.run.get("name"),
                           num_tokens=ns.num_tokens or icfg.get("num_tokens", SAFESAIL_NUM_TOKENS),
                           q=icfg.get("quantile", SAFESAIL_QUANTILE), sae_k=icfg.get("sae_k", SAFESAIL_K),
                           sae_arch=icfg.get("sae_arch", SAFESAIL_ARCH), hook_site=icfg.get("hook_site", SAFESAIL_HOOK_SITE))
    if s.get("set_aside"):
        print(f"{path} was corrupt: kept it as {s['set_aside']} and imported into a fresh DB")
    print(f"imported {s['entries']} entries ({', '.join(s['langs']) or 'no explanations'}) on layers {s['layers']} "
          f"({s['latents_with_quantiles']} latents with quantiles) into {path}")


def _stats(cfg: DictConfig, ns) -> None:
    from safesail.neurondb.store import NeuronDB

    with NeuronDB.open(db_path(cfg, ns.db)) as db:
        st = db.stats()
    if ns.json:
        print(json.dumps(st, indent=2))
        return
    print(f"model {st['model']}  run {st['run']}  source {st['source']}  schema v{st['schema_version']}")
    t = st["totals"]
    print(f"{t['latents']} latents, {t['explained']} explained, {t['tagged']} tagged")
    print("layer  latents  explained  scored  tagged")
    for layer, v in st["per_layer"].items():
        print(f"{layer:>5}  {v['latents']:>7}  {v['explained']:>9}  {v['scored']:>6}  {v['tagged']:>6}")
    print("domains: " + ", ".join(f"{d} {n}" for d, n in st["per_domain"].items()))
    print("simulation scores: " + ", ".join(f"{b} {n}" for b, n in st["per_score_band"].items()))
    for kind, v in st.get("per_kind", {}).items():
        mean = "-" if v["mean"] is None else f"{v['mean']:.3f}"
        print(f"  {kind}: {v['scored']} scored, mean {mean}, {v['beats_shuffled']} beat the shuffled control")
    if st.get("verify_effects"):
        print(f"causal-check results: {st['verify_effects']}")


def _fmt_score(x) -> str:
    return "  -  " if x is None else f"{x:5.3f}"


def _search(cfg: DictConfig, ns) -> None:
    from safesail.neurondb.store import NeuronDB

    with NeuronDB.open(db_path(cfg, ns.db)) as db:
        kinds = db.score_kinds()
        if kinds and ns.kind not in kinds:
            raise UserError(f"the neuron database has no {ns.kind!r} scores; --kind takes one of {', '.join(kinds)}.")
        rows = db.search(" ".join(ns.text) or None, domain=ns.domain, min_score=ns.min_score,
                         max_score=ns.max_score, layer=ns.layer, limit=ns.limit, kind=ns.kind)
    if ns.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        print("no latent matches")
    for r in rows:
        expl = (r["explanation"] or "(no explanation)").replace("\n", " ")
        print(f"{r['layer']}_{r['index']:<6} {_fmt_score(r['score'])}  [{','.join(r['tags'])}]  {expl[:100]}")


def _fmt_opt(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _print_scores(scores: dict) -> None:
    if not scores:
        print("scores: none")
        return
    print("scorer       value   95% interval      shuffled  constant  beats   n  calls  tokens(p/c)  status")
    for kind, sc in scores.items():
        ci = f"[{_fmt_opt(sc['ci_low'])}, {_fmt_opt(sc['ci_high'])}]" if sc["ci_low"] is not None else "-"
        beats = {True: "yes", False: "no", None: "-"}[sc["beats_shuffled"]]
        print(f"{kind:<11} {_fmt_opt(sc['value']):>6}   {ci:<16} {_fmt_opt(sc['control_shuffled']):>8}  "
              f"{_fmt_opt(sc['control_constant']):>8}  {beats:>5} {_fmt_opt(sc['n_examples'], '{}'):>3}  "
              f"{_fmt_opt(sc['llm_calls'], '{}'):>5}  {_fmt_opt(sc['prompt_tokens'], '{}')}/"
              f"{_fmt_opt(sc['completion_tokens'], '{}')}  {sc['status'] or '-'}"
              + (f" ({sc['failure']})" if sc["failure"] else ""))


def _print_effects(effects: list[dict]) -> None:
    if not effects:
        return
    print("causal checks:")
    for e in effects:
        ci = f" [{_fmt_opt(e['ci_low'])}, {_fmt_opt(e['ci_high'])}]" if e["ci_low"] is not None else ""
        where = ", ".join(x for x in (e["domain"], e["lang"]) if x)
        print(f"  {e['check']:<13} {e['metric']}{' (' + where + ')' if where else ''}"
              f"{' vs ' + e['target'] if e['target'] != 'latent' else ''}: {_fmt_opt(e['value'])}{ci}  n={e['n']}")


def _show(cfg: DictConfig, ns) -> None:
    from safesail.neurondb.store import NeuronDB

    with NeuronDB.open(db_path(cfg, ns.db)) as db:
        hook = ns.hook or db.hook_for_layer(ns.layer)
        rec = db.latent(hook, ns.index, max_examples=ns.examples)
    if rec is None:
        raise UserError(f"latent {ns.index} of {hook} is not in the neuron database; find one with `safesail db search`.")
    if ns.json:
        print(json.dumps(rec, indent=2, ensure_ascii=False))
        return
    print(f"{hook} latent {rec['index']}  (neuron {rec['layer']}_{rec['index']})")
    langs = rec.get("explanations") or {}
    if len(langs) > 1:
        for lang, text in langs.items():
            print(f"explanation ({lang}): {text}")
    else:
        print(f"explanation: {rec['explanation']}")
    print(f"tags: {', '.join(rec['tags']) or 'general'}")
    _print_scores(rec.get("scores") or {})
    _print_effects(rec.get("verify_effects") or [])
    print(f"density: {rec['density']}  0.999 quantile: {rec['quantile_999']} ({rec['quantile_source']})  "
          f"max: {rec['max_act']}")
    for ex in rec["examples"]:
        toks = ex["tokens"] or []
        acts = ex["acts"] or []
        text = "".join(f"[{t}]" if a and a > 0 else t for t, a in zip(toks, acts))
        print(f"  #{ex['rank']} {ex.get('kind') or ''} {ex.get('split') or ''}: {text[:160]}")
