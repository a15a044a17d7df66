"""The `safesail` command: `safesail <stage> [args] [hydra overrides]`.

Every stage is a function `fn(cfg: DictConfig, args: list[str]) -> None` named in
STAGES. Arguments that look like Hydra overrides (`key=value`, `+key=value`,
`~key`) or Hydra flags (`-m`, `--cfg job`, ...) go to Hydra; the rest (for
example `safesail db search "violence"` or `safesail diagnose --json "..."`) are
handed to the stage as `args`.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import sys
from pathlib import Path

from safesail.errors import UserError

log = logging.getLogger("safesail")

# stage name -> "module:function"; `run` runs the pipeline stages in order.
STAGES: dict[str, str] = {
    "cache": "safesail.train.cache:run_cache_stage",
    "train": "safesail.train.stage:run_train_stage",
    "select": "safesail.train.select_stage:run_select_stage",
    "collect": "safesail.interpret.collect:run_collect_stage",
    "explain": "safesail.interpret.explain:run_explain_stage",
    "score": "safesail.interpret.scoring.stage:run_score_stage",
    "tag": "safesail.interpret.tag:run_tag_stage",
    "verify": "safesail.verify.stage:run_verify_stage",
    "db": "safesail.neurondb.cli:run_db_command",
    "serve": "safesail.diagnose.server:run_serve_stage",
    "diagnose": "safesail.diagnose.cli:run_diagnose_stage",
    "run": "safesail.pipeline:run_pipeline",
}

STAGE_HELP = {
    "cache": "cache MLP-output activations of the source model",
    "train": "train the SAE sweep on the activation cache",
    "select": "choose the most interpretable SAE per hook with contrastive pairs",
    "collect": "collect per-latent statistics and example segments",
    "explain": "explain latents with an LLM",
    "score": "score explanations by simulation",
    "tag": "tag latents with safety domains",
    "verify": "causal checks: steer and ablate tagged latents, refusal effects",
    "db": "build / export / import / query the neuron database",
    "serve": "serve the diagnose web page and JSON API",
    "diagnose": "print per-token safety latents for a query",
    "run": "run every stage in order (skipping finished ones)",
}

# Hydra flags that take a value in the next argument.
_HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                           "--config-name", "-cn", "--config-dir", "-cd", "--info", "-i"}
_HYDRA_FLAGS = {"-m", "--multirun", "--resolve", "--hydra-help", "--run", "-r"}
_OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/\-]*(=|$)")

# The config folder lives next to the package in the source tree (editable install).
CONFIG_DIR = Path(os.environ.get("SAFESAIL_CONFIG_DIR",
                                 Path(__file__).resolve().parents[1] / "configs"))


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split command-line words into (hydra_args, stage_args)."""
    hydra_args: list[str] = []
    stage_args: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _HYDRA_FLAGS_WITH_VALUE:
            hydra_args.extend(argv[i:i + 2])
            i += 2
            continue
        if a in _HYDRA_FLAGS:
            hydra_args.append(a)
        elif "=" in a and _OVERRIDE.match(a):
            hydra_args.append(a)
        elif a.startswith("~") and _OVERRIDE.match(a):
            hydra_args.append(a)
        else:
            stage_args.append(a)
        i += 1
    return hydra_args, stage_args


_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EACCES: "permission was denied", errno.EPERM: "the operation was not permitted",
                errno.EROFS: "the file system is read-only"}


def disk_error_message(e: OSError) -> str | None:
    """One sentence for disk-full and permission errors; None for other OS errors."""
    what = _DISK_ERRNOS.get(e.errno or 0)
    if what is None:
        return None
    where = f" writing {e.filename}" if e.filename else ""
    return (f"{what}{where}; free space or fix permissions (or choose another run.root=...) and re-run: "
            "finished work is kept and the stage continues where it stopped.")


def resolve_stage(name: str):
    target = STAGES[name]
    module_name, fn_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, fn_name)


def _usage() -> str:
    lines = ["usage: safesail <stage> [args] [key=value ...] [-m]", "", "stages:"]
    lines += [f"  {name:<9} {STAGE_HELP[name]}" for name in STAGES]
    lines += ["", "Examples:", "  safesail run", "  safesail cache experiment=smoke",
              "  safesail train -m sae.k=32,64",
              "  safesail db search violence", "  safesail diagnose \"How do I ...?\""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        sys.exit(0 if argv else 2)
    stage = argv[0]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}.", file=sys.stderr)
        sys.exit(2)
    if not (CONFIG_DIR / "config.yaml").is_file():
        print(f"error: the config folder {CONFIG_DIR} is missing; install Safe-SAIL from its source "
              "tree with `pip install -e .` or set SAFESAIL_CONFIG_DIR.", file=sys.stderr)
        sys.exit(2)
    hydra_args, stage_args = split_args(argv[1:])

    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def _entry(cfg: DictConfig) -> None:
        from safesail.logging_setup import setup_logging

        setup_logging()
        fn = resolve_stage(stage)
        try:
            fn(cfg, stage_args)
        except UserError as e:
            # One clear sentence, no traceback, exit non-zero.
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            message = disk_error_message(e)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    saved = sys.argv
    sys.argv = [f"safesail {stage}"] + hydra_args
    try:
        _entry()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
