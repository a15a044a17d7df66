"""The `safesail` command: `safesail <stage> [args] [hydra overrides]`.

Every stage is a function `fn(cfg: DictConfig, args: list[str]) -> None` named in the
table of stages (`safesail/stages.py`). Arguments that look like Hydra overrides (`key=value`, `+key=value`,
`~key`) or Hydra flags (`-m`, `--cfg job`, ...) go to Hydra; the rest (for
example `safesail db search "violence"` or `safesail diagnose --json "..."`) are
handed to the stage as `args`. `safesail <stage> --help` prints the stage's purpose, main
keys and an example without running it; overrides are checked before anything is written
(`safesail.config.check_overrides`); Ctrl-C prints one line and exits 130.
"""

from __future__ import annotations

import errno
import logging
import re
import sys

from safesail.config import CONFIG_DIR, check_overrides
from safesail.errors import UserError
from safesail.stages import BY_NAME, STAGES, stage_help

log = logging.getLogger("safesail")

# Hydra flags that take a value in the next argument.
_HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                           "--config-name", "-cn", "--config-dir", "-cd", "--info", "-i"}
_HYDRA_FLAGS = {"-m", "--multirun", "--resolve", "--hydra-help", "--run", "-r"}
_OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/\-]*(=|$)")


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


INTERRUPTED = "interrupted; re-run the same command to resume"


def _interrupted() -> None:
    """Ctrl-C: the one line on a line of its own (after a progress bar or the terminal's "^C"), exit 130."""
    print("\n" + INTERRUPTED, file=sys.stderr)
    sys.exit(130)


def _usage() -> str:
    lines = ["usage: safesail <stage> [args] [key=value ...] [-m]", "", "stages:"]
    lines += [f"  {s.name:<9} {s.help}" for s in STAGES]
    lines += ["", "`safesail <stage> --help` shows a stage's main keys and an example.", "", "Examples:",
              "  safesail run", "  safesail cache experiment=smoke", "  safesail train -m sae.k=32,64",
              "  safesail db search violence", "  safesail diagnose \"How do I ...?\""]
    return "\n".join(lines)


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _run_stage(fn, cfg, stage_args: list[str]) -> None:
    """Call a stage; expected mistakes and Ctrl-C become one line."""
    try:
        fn(cfg, stage_args)
    except UserError as e:
        _fail(str(e))  # one clear sentence, no traceback, exit 2
    except KeyboardInterrupt:
        _interrupted()
    except OSError as e:
        message = disk_error_message(e)
        if message is None:
            raise
        _fail(message)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        sys.exit(0 if argv else 2)
    name = argv[0]
    if name not in BY_NAME:
        _fail(f"unknown stage {name!r}; choose one of: {', '.join(BY_NAME)}.")
    stage = BY_NAME[name]
    if not (CONFIG_DIR / "config.yaml").is_file():
        _fail(f"the config folder {CONFIG_DIR} is missing; install Safe-SAIL from its source "
              "tree with `pip install -e .` or set SAFESAIL_CONFIG_DIR.")
    hydra_args, stage_args = split_args(argv[1:])
    if "-h" in stage_args or "--help" in stage_args:
        print(stage_help(stage))
        sys.exit(0)
    if stage_args and not stage.takes_args:
        _fail(f"`safesail {name}` takes no arguments besides key=value overrides, not {' '.join(stage_args)!r}; "
              f"see `safesail {name} --help`.")
    overrides = [a for a in hydra_args if "=" in a or a.startswith("~")]
    flags = [a for a in hydra_args if a.startswith("-")]
    if set(flags) <= {"-m", "--multirun"}:
        try:
            check_overrides(overrides)  # one sentence for a bad key or value; nothing written yet
        except UserError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _interrupted()

    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def _entry(cfg: DictConfig) -> None:
        from safesail.logging_setup import setup_logging

        setup_logging()
        _run_stage(stage.resolve(), cfg, stage_args)

    saved = sys.argv
    sys.argv = [f"safesail {name}"] + hydra_args
    try:
        _entry()
    except KeyboardInterrupt:
        _interrupted()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
