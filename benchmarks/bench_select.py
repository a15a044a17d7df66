"""Benchmark of `safesail select` on an existing sweep (cache + train already run).

Measures, side by side in one process:
  baseline  the model forward over every pair query alone (capture_pair_activations),
            the floor any SAE selection by pairs has to pay;
  stage     the whole select stage from scratch (forward + every SAE + files + plot);
and prints the ratio stage / baseline, then per hook the ranking of the sweep's SAEs by
I_CDF (macro over domains, best first) next to the ranking by FVU (best first), with
Kendall's tau between them.

    python benchmarks/bench_select.py run.root=/tmp/selbench/runs            # embedded default sweep
    python benchmarks/bench_select.py experiment=smoke run.root=/tmp/selsmoke
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def kendall_tau(a: list[str], b: list[str]) -> float:
    """Kendall's tau between two rankings of the same items (1: same order, -1: reversed)."""
    pos_b = {x: i for i, x in enumerate(b)}
    conc = disc = 0
    for x, y in itertools.combinations(a, 2):
        s = pos_b[x] - pos_b[y]
        conc += s < 0
        disc += s > 0
    n = conc + disc
    return (conc - disc) / n if n else 1.0


def main(overrides: list[str]) -> None:
    import torch

    from safesail.config import compose
    from safesail.hooks import HookPoint
    from safesail.logging_setup import setup_logging
    from safesail.models import load_model
    from safesail.rundir import RunDir
    from safesail.train.pair_activations import capture_pair_activations
    from safesail.train.pairs import load_pairs
    from safesail.train.select_stage import SelectSettings, configured_hooks, run_select_stage
    from safesail.train.selection import load_selection

    setup_logging("WARNING")
    cfg = compose(["device=cpu", *overrides])
    rd = RunDir.from_cfg(cfg)
    settings = SelectSettings.from_cfg(cfg)
    pairs = load_pairs(settings.pairs, settings.domains)
    hooks = [HookPoint.parse(h) for h in configured_hooks(cfg)]

    # baseline: load the model and run the pairs through it once
    t0 = time.perf_counter()
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.cache_dir)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    pa = capture_pair_activations(lm, pairs, hooks, cfg.model.get("system_prompt"), settings.batch_size,
                                  cfg.model.get("max_length"))
    t_forward = time.perf_counter() - t1
    baseline = time.perf_counter() - t0
    del lm, pa

    # the stage from scratch
    shutil.rmtree(rd.root / "selection", ignore_errors=True)
    (rd.stages / "select.json").unlink(missing_ok=True)
    t2 = time.perf_counter()
    run_select_stage(cfg, [])
    stage = time.perf_counter() - t2

    sel = load_selection(rd)
    n_saes = len(sel["saes"])
    print()
    print(f"model {cfg.model.name}, {len(pairs)} pairs ({2 * len(pairs)} queries), {len(hooks)} hook(s), "
          f"{n_saes} SAEs, torch threads {torch.get_num_threads()}")
    print(f"baseline (model load {t_load:.1f} s + pairs forward {t_forward:.1f} s): {baseline:.1f} s")
    print(f"select stage from scratch: {stage:.1f} s  = {stage / baseline:.2f} x baseline; "
          f"{(stage - baseline) / max(n_saes, 1):.2f} s per SAE beyond the baseline")
    taus = []
    for hook in sel["chosen"]:
        recs = [r for r in sel["saes"] if r["hook"] == hook]
        by_icdf = [r["name"] for r in sorted(recs, key=lambda r: -r["figures"]["macro"]["i_cdf"])]
        with_fvu = [r for r in recs if r["train_metrics"].get("fvu") is not None]
        by_fvu = [r["name"] for r in sorted(with_fvu, key=lambda r: r["train_metrics"]["fvu"])]
        icdf = {r["name"]: r["figures"]["macro"]["i_cdf"] for r in recs}
        fvu = {r["name"]: r["train_metrics"].get("fvu") for r in recs}
        print(f"\n{hook}  (chosen: {sel['chosen'][hook]['sae']})")
        print("  by I_CDF: " + ", ".join(f"{n} ({icdf[n]:.4f})" for n in by_icdf))
        print("  by FVU:   " + ", ".join(f"{n} ({fvu[n]:.3f})" for n in by_fvu))
        if len(by_fvu) == len(by_icdf) and len(by_icdf) > 1:
            tau = kendall_tau(by_icdf, by_fvu)
            taus.append(tau)
            print(f"  Kendall tau(I_CDF order, FVU order) = {tau:+.2f}; same winner: {by_icdf[0] == by_fvu[0]}")
    if taus:
        print(f"\nmean Kendall tau over hooks: {sum(taus) / len(taus):+.2f}")
    print(json.dumps({"baseline_s": round(baseline, 2), "stage_s": round(stage, 2),
                      "ratio": round(stage / baseline, 2), "n_saes": n_saes, "n_pairs": len(pairs)}))


if __name__ == "__main__":
    main(sys.argv[1:])
