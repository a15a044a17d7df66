"""The table of stages: what `safesail <stage>` runs, and what `safesail run` runs in order.

Each stage is a function `fn(cfg: DictConfig, args: list[str]) -> None` in a module of the
library; this table names it as "module:function" (imported only when the stage runs), with
a one-line help, the config keys a user most often sets, an example, and whether `safesail
run` includes it. The CLI (`safesail/cli.py`) and the pipeline (`safesail/pipeline.py`) both
read this table; a new stage is one new row here (docs/extending.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str
    target: str                        # "package.module:function"
    help: str                          # one line: what the stage does
    keys: tuple[str, ...] = ()         # main config keys, shown by `safesail <stage> --help`
    example: str = ""
    in_run: bool = True                # part of `safesail run`
    run_args: tuple[str, ...] = ()     # the words `safesail run` passes to it
    takes_args: bool = False           # accepts words besides key=value overrides
    parser: str | None = None          # "module:function" returning its argparse parser (for --help)
    details: tuple[str, ...] = field(default=())

    def resolve(self) -> Callable:
        module_name, fn_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), fn_name)


STAGES: tuple[Stage, ...] = (
    Stage("cache", "safesail.train.cache:run_cache_stage",
          "cache MLP-output activations of the source model",
          ("model=<name>", "model.layers", "data=<name>", "data.max_tokens", "cache.dtype", "cache.batch_size"),
          "safesail cache experiment=smoke"),
    Stage("train", "safesail.train.stage:run_train_stage",
          "train the SAE sweep on the activation cache",
          ("sae.saes", "sae.k", "sae.arch", "sae.hooks", "sae.expansion", "train.batch_size", "train.epochs",
           "train.overwrite"),
          "safesail train -m sae.k=32,64"),
    Stage("select", "safesail.train.select_stage:run_select_stage",
          "choose the most interpretable SAE per hook with contrastive pairs",
          ("select.criterion", "select.max_fvu", "select.min_ce_loss_recovered", "select.pairs"),
          "safesail select experiment=smoke"),
    Stage("collect", "safesail.interpret.collect:run_collect_stage",
          "collect per-latent statistics and example segments",
          ("collect.max_tokens", "collect.quantile", "collect.k_top", "collect.latents"),
          "safesail collect collect.max_tokens=100000"),
    Stage("explain", "safesail.interpret.explain:run_explain_stage",
          "explain latents with an LLM",
          ("llm=<name>", "llm.model", "explain.max_segments", "explain.hooks"),
          "safesail explain llm=openai llm.model=gpt-4o-mini"),
    Stage("score", "safesail.interpret.scoring.stage:run_score_stage",
          "score explanations (simulation and other scorers, with controls)",
          ("llm=<name>", "score.scorers", "score.controls", "score.mode", "score.granularity"),
          "safesail score llm=vllm"),
    Stage("tag", "safesail.interpret.tag:run_tag_stage",
          "tag latents with safety domains",
          ("tag.rule", "llm=<name>"),
          "safesail tag tag.rule=both"),
    Stage("verify", "safesail.verify.stage:run_verify_stage",
          "causal checks: steer and ablate tagged latents, refusal effects",
          ("verify.max_latents", "device"),
          "safesail verify experiment=smoke"),
    Stage("db", "safesail.neurondb.cli:run_db_command",
          "build / export / import / query the neuron database",
          ("db.export.score_cut",),
          "safesail db search violence", run_args=("build",), takes_args=True,
          parser="safesail.neurondb.cli:_parser"),
    Stage("saes", "safesail.saes.interop_stage:run_saes_command",
          "import third-party SAEs (SAELens, sparsify, Safe-SAIL) or export ours in their layouts",
          ("model.layers", "model.hook_site"),
          "safesail saes export --format sparsify", in_run=False, takes_args=True,
          parser="safesail.saes.interop_stage:parser"),
    Stage("serve", "safesail.diagnose.server:run_serve_stage",
          "serve the diagnose web page and JSON API",
          ("diagnose.host", "diagnose.port", "diagnose.db"),
          "safesail serve experiment=demo", in_run=False),
    Stage("diagnose", "safesail.diagnose.cli:run_diagnose_stage",
          "print per-token safety latents for a query",
          ("diagnose.db", "diagnose.max_new_tokens"),
          'safesail diagnose "How do I ...?"', in_run=False, takes_args=True,
          parser="safesail.diagnose.cli:parser"),
    Stage("run", "safesail.pipeline:run_pipeline",
          "run every stage in order (skipping finished ones)",
          ("experiment=<name>", "run.name", "run.root"),
          "safesail run experiment=smoke", in_run=False, takes_args=True,
          details=("words after `run` pick stages, e.g. `safesail run cache train`",)),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
PIPELINE: tuple[Stage, ...] = tuple(s for s in STAGES if s.in_run)


def get_stage(name: str) -> Stage:
    """The stage called `name`; KeyError names the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; choose one of: {', '.join(BY_NAME)}") from None


def resolve_stage(name: str) -> Callable:
    """The stage's function, imported on demand."""
    return get_stage(name).resolve()


def stage_help(stage: Stage) -> str:
    """What `safesail <stage> --help` prints: purpose, main keys, an example."""
    lines = [f"usage: safesail {stage.name}" + (" [args]" if stage.takes_args else "") + " [key=value ...]",
             "", stage.help + ("" if stage.in_run else " (not part of `safesail run`)") + ".", *stage.details]
    if stage.keys:
        lines += ["", "main keys (any config key can be set as key=value; see configs/):"]
        lines += [f"  {k}" for k in stage.keys]
    if stage.example:
        lines += ["", "example:", f"  {stage.example}"]
    if stage.parser:
        module_name, fn_name = stage.parser.split(":")
        parser = getattr(importlib.import_module(module_name), fn_name)()
        lines += ["", parser.format_help().rstrip()]
    return "\n".join(lines)
