"""`safesail saes import|export|list`: SAEs in and out of a run, in SAELens, sparsify or Safe-SAIL layouts.

    safesail saes export --format saelens|sparsify|safesail [--all] [--sae FOLDER] [--out DIR]
    safesail saes import --format saelens|sparsify|safesail PATH [--hook H] [--name N] [--k K] [--force]
    safesail saes list

Export writes the chosen SAE of every hook (selection.json; every SAE of the run with `--all`,
or one folder with `--sae`) under `runs/<name>/export/saes/<format>/`:
saelens `<hook>/<sae>/`, sparsify `<hookpoint>/` (as `SparseCoder.load_many` expects),
safesail `ckpt_layer<L>.pt`; with `--all` each SAE's files sit under a folder of its name.
Import converts third-party SAEs into our layout at `runs/<name>/saes/<hook>/<format>-<sae>/`,
where select, collect, explain, score, tag, db and diagnose use them like trained ones
(pick one with `+select.override={<hook>: <name>}`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from safesail.errors import UserError
from safesail.hooks import HookPoint
from safesail.rundir import RunDir
from safesail.saes.interop import FORMATS, export_foreign, find_saes, load_foreign, sparsify_hookpoint

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safesail saes", description="Import or export SAEs in other tools' layouts.")
    sub = p.add_subparsers(dest="command", metavar="{import,export,list}")
    ex = sub.add_parser("export", help="write this run's SAEs in a third-party layout")
    ex.add_argument("--format", required=True, choices=FORMATS)
    ex.add_argument("--all", action="store_true", help="every SAE of the run, not only the chosen one per hook")
    ex.add_argument("--sae", metavar="FOLDER", help="one SAE folder (ours) to export")
    ex.add_argument("--out", metavar="DIR", help="where to write (default runs/<name>/export/saes/<format>)")
    im = sub.add_parser("import", help="bring third-party SAEs into this run")
    im.add_argument("--format", required=True, choices=FORMATS)
    im.add_argument("path", metavar="PATH", help="the SAE's folder or file, or a folder holding several")
    im.add_argument("--hook", help="our hook name (layers.<L>.mlp_out or layers.<L>.resid) when the files do not say")
    im.add_argument("--name", help="folder name under saes/<hook>/ (default <format>-<arch>-k<k>)")
    im.add_argument("--k", type=int, help="TopK k of a Safe-SAIL checkpoint (default 200, the release's)")
    im.add_argument("--force", action="store_true", help="replace an SAE of that name with other weights")
    sub.add_parser("list", help="the run's SAEs")
    return p


def run_saes_command(cfg: DictConfig, args: list[str]) -> None:
    try:
        ns = parser().parse_args(args)
    except SystemExit as e:
        if e.code:
            raise UserError("bad arguments to `safesail saes`; see `safesail saes --help`.") from None
        raise
    if ns.command is None:
        raise UserError("say what to do: `safesail saes import ...`, `safesail saes export ...` or "
                        "`safesail saes list`.")
    rd = RunDir.from_cfg(cfg)
    if ns.command == "export":
        export_saes(cfg, rd, ns.format, all_saes=ns.all, one=Path(ns.sae) if ns.sae else None,
                    out=Path(ns.out) if ns.out else None)
    elif ns.command == "import":
        import_saes(cfg, rd, ns.format, Path(ns.path), hook=ns.hook, name=ns.name, k=ns.k, force=ns.force)
    else:
        from safesail.saes import list_saes

        for folder in list_saes(rd.root / "saes"):
            print(folder.relative_to(rd.root))


# ---- export -------------------------------------------------------------------------------------------------

def _run_saes(cfg, rd: RunDir, all_saes: bool) -> list[Path]:
    from safesail.saes import list_saes

    if not all_saes and rd.selection_file.is_file():
        from safesail.train.selection import chosen_sae_dirs

        return [Path(p) for _, p in sorted(chosen_sae_dirs(cfg, rd.root).items())]
    found = list_saes(rd.root / "saes")
    if not found:
        raise UserError(f"{rd.root / 'saes'} holds no SAE; run `safesail train` (or `safesail saes import`) first.")
    return found


def export_saes(cfg, rd: RunDir, fmt: str, all_saes: bool = False, one: Path | None = None,
                out: Path | None = None) -> list[Path]:
    from safesail.saes import load_sae

    out = out or rd.export / "saes" / fmt
    folders = [one] if one is not None else _run_saes(cfg, rd, all_saes)
    saes = [load_sae(f) for f in folders]
    nested = all_saes or len(folders) > len({str(s.cfg.hook) for s in saes})
    written = []
    for folder, sae in zip(folders, saes):
        hook = sae.cfg.hook
        if not hook:
            raise UserError(f"the SAE in {folder} records no hook point; set \"hook\" in its cfg.json "
                            "(e.g. layers.7.mlp_out).")
        base = out / folder.name if nested else out
        dest = {"saelens": base / hook / folder.name if not nested else base / hook,
                "sparsify": base / sparsify_hookpoint(hook),
                "safesail": base / f"ckpt_layer{HookPoint.parse(hook).layer}.pt"}[fmt]
        written.append(export_foreign(fmt, sae, dest))
        log.info("saes: %s -> %s", folder, dest)
    print(f"exported {len(written)} SAE(s) in the {fmt} layout to {out}")
    return written


# ---- import -------------------------------------------------------------------------------------------------

def import_saes(cfg, rd: RunDir, fmt: str, path: Path, hook: str | None = None, name: str | None = None,
                k: int | None = None, force: bool = False) -> list[Path]:
    from safesail.saes import load_sae, save_sae

    site = str(cfg.model.get("hook_site", "mlp_out"))
    found = find_saes(fmt, path, site)
    if not found:
        raise UserError(f"no {fmt} SAE found at {path}; give the folder (or file) of one, or a folder holding "
                        "several.")
    if (hook or name) and len(found) > 1:
        raise UserError(f"{path} holds {len(found)} SAEs; --hook and --name apply to one, so point at one of them.")
    model = str(cfg.model.name)
    layers = {int(x) for x in cfg.model.get("layers") or []}
    written = []
    for item in found:
        h = hook or item.hook
        if h is None:
            raise UserError(f"cannot tell which hook point the SAE in {item.path} reads; pass --hook "
                            "layers.<L>.mlp_out (or layers.<L>.resid).")
        h = HookPoint.parse(h).name
        sae = load_foreign(fmt, item.path, h, model, k)
        folder = rd.saes(h) / (name or f"{fmt}-{sae.cfg.name}")
        if (folder / "cfg.json").is_file():
            old = load_sae(folder)
            same = all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), sae.state_dict().values()))
            if same and old.cfg.arch == sae.cfg.arch:
                log.info("saes: %s already holds this SAE; nothing to do", folder)
                written.append(folder)
                continue
            if not force:
                raise UserError(f"{folder} already holds another SAE; pass --name to import beside it or --force "
                                "to replace it.")
        save_sae(sae, folder)
        written.append(folder)
        rel = folder.relative_to(rd.root)
        print(f"imported {item.path} as {rel} ({sae.cfg.arch}, {sae.cfg.n_latents} latents, d_in {sae.cfg.d_in})")
        if HookPoint.parse(h).layer not in layers:
            log.warning("saes: layer %d is not in model.layers=%s; add it so that select and collect see this SAE",
                        HookPoint.parse(h).layer, sorted(layers))
    if written:
        picks = ", ".join(f"{f.parent.name}: {f.name}" for f in written)
        print(f"use it: safesail select '+select.override={{{picks}}}', then collect, explain, score, tag, db build")
    return written
