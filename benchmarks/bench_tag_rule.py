"""Which tag rule to use: each rule's precision and recall per domain on held-out bundled pairs.

On a run where select, explain and tag have run: the pair queries go through the source
model once, the chosen SAE at each hook encodes them, and for the tagged (explained) latents
`safesail.interpret.tag_rule.two_fold` measures the four rules (either, both, pairs_only,
llm_only): pair evidence from one half of the pairs, precision/recall of "a latent tagged d
fires on the query" against the other half's labels, both directions summed. The LLM
evidence is the one the tag stage recorded (interpret/tags.jsonl).

    python benchmarks/bench_tag_rule.py run.root=/tmp/et/runs [tag.alpha=0.01 ...] [--out rule.json]
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str]) -> None:
    import torch

    from safesail.config import compose
    from safesail.hooks import HookPoint
    from safesail.interpret.tag import DOMAINS, tag_settings
    from safesail.interpret.tag_rule import choose, two_fold
    from safesail.jsonl import last_per_latent
    from safesail.logging_setup import setup_logging
    from safesail.models import load_model
    from safesail.rundir import RunDir
    from safesail.saes import load_sae
    from safesail.train.pair_activations import capture_pair_activations, sae_query_max
    from safesail.train.pairs import load_pairs
    from safesail.train.select_stage import SelectSettings
    from safesail.train.selection import chosen_sae_dirs

    out_path = None
    if "--out" in argv:
        i = argv.index("--out")
        out_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    setup_logging("WARNING")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = compose(["device=cpu", *argv])
    rd = RunDir.from_cfg(cfg)
    s = tag_settings(cfg)
    settings = SelectSettings.from_cfg(cfg)
    pairs = load_pairs(settings.pairs, settings.domains)
    tags = last_per_latent(rd.interpret / "tags.jsonl")
    if not tags:
        sys.exit(f"{rd.interpret / 'tags.jsonl'} holds no tags; run `safesail tag` first.")
    dirs = chosen_sae_dirs(cfg, rd.root)
    keys = sorted(k for k in tags if k[0] in dirs)
    hooks = sorted({h for h, _ in keys})

    t0 = time.perf_counter()
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.get("cache_dir"))
    pa = capture_pair_activations(lm, pairs, [HookPoint.parse(h) for h in hooks], cfg.model.get("system_prompt"),
                                  batch_size=int(settings.batch_size), max_length=cfg.model.get("max_length"))
    del lm
    cols_c, cols_n = [], []
    for h in hooks:
        lat = [j for hh, j in keys if hh == h]
        qmax = sae_query_max(load_sae(dirs[h]), pa.acts[h], pa.query_index, pa.n_queries)
        cols_c.append(qmax[0::2][:, lat])
        cols_n.append(qmax[1::2][:, lat])
    cmax, nmax = torch.cat(cols_c, 1), torch.cat(cols_n, 1)
    forward_s = time.perf_counter() - t0
    llm = [(tags[k].get("evidence") or {}).get("llm") for k in keys]
    got = two_fold(cmax, nmax, [p.id for p in pairs], [p.domain for p in pairs], llm,
                   float(settings.fire_threshold), s)
    best = choose(got)

    print(f"{len(keys)} tagged latents on {len(hooks)} hooks, {len(pairs)} pairs (two folds); "
          f"pairs forward + encode {forward_s:.0f} s; alpha {s['alpha']}, fire threshold {settings.fire_threshold}")
    print("| rule | " + " | ".join(f"{d} P / R (latents)" for d in DOMAINS) + " | macro F1 |")
    print("|---|" + "---|" * (len(DOMAINS) + 1))
    for r, m in got.items():
        cells = []
        for d in DOMAINS:
            v = m["domains"][d]
            p = "-" if v["precision"] is None else f"{v['precision']:.2f}"
            cells.append(f"{p} / {v['recall']:.2f} ({v['latents']:g})")
        print(f"| {r}{' (chosen)' if r == best else ''} | " + " | ".join(cells) + f" | {m['macro_f1']:.3f} |")
    llm_status = {}
    for e in llm:
        st = (e or {}).get("status", "not_asked")
        llm_status[st] = llm_status.get(st, 0) + 1
    print(f"LLM tagger replies: {llm_status}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"rules": got, "chosen": best, "latents": [list(k) for k in keys], "llm_status": llm_status,
                       "settings": s}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
