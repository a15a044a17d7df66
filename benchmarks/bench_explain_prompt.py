"""The explain prompt side by side: v2 (session 1) against v3 (peak tokens listed with counts), same latents.

On a run where select and collect have run: the latents explain would pick (explain.top_per_domain,
explain.rank), each asked with both prompt styles by the configured LLM (one process, one model), the
replies parsed and checked for copies exactly as the stage does (one retry with other examples after a
copy). Prints per latent its peak tokens and both answers, for a reader's right / vague / wrong verdict,
and the counts of copies and failures; --out writes the rows as JSON.

    python benchmarks/bench_explain_prompt.py run.root=/tmp/cand/runs run.name=demo experiment=demo \
        llm=qwen-coder-1.5b [--out prompts.json]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


async def ask(client, task, ecfg, style: str) -> dict:
    from safesail.interpret.clients.base import ChatRequest, LLMError
    from safesail.interpret.explain import fit_prompt, rotation_of
    from safesail.interpret.prompts.explain import (EXAMPLES, N_V2_EXAMPLES, ExplanationError, copied_reason,
                                                    parse_explanation)

    pool = len(EXAMPLES) if style == "v3" else N_V2_EXAMPLES
    rotation = rotation_of(task) % pool
    out = {"copied": [], "status": "failed", "explanation": None}
    for attempt in range(2):
        msgs, n = fit_prompt(client, task, int(ecfg.max_segments), int(ecfg.max_tokens), rotation, style)
        try:
            comp = await client.chat(ChatRequest(messages=msgs, max_tokens=int(ecfg.max_tokens),
                                                 temperature=float(ecfg.temperature), stop=list(ecfg.stop or [])))
            text = parse_explanation(comp.text, int(ecfg.max_chars), ecfg.get("language"))
        except (LLMError, ExplanationError) as e:
            out["reason"] = e.reason
            return out
        why = copied_reason(text, ["".join(s["tokens"]) for s in task.segments[:n]])
        if not why:
            out.update(status="ok", explanation=text)
            return out
        out["copied"].append(text)
        out["reason"] = "copied_example"
        rotation += pool // 2 + 1
    return out


async def run(cfg, tasks) -> list[dict]:
    from safesail.interpret.clients import make_client
    from safesail.rundir import RunDir

    rd = RunDir.from_cfg(cfg)
    client = make_client(cfg.llm, rd.llm_cache_file, cache_dir=cfg.get("cache_dir"), device="cpu")
    rows = []
    try:
        await client.ensure_ready()
        for t in tasks:
            peaks = Counter()
            for s in t.segments:
                i = max(range(len(s["acts"])), key=lambda k: s["acts"][k])
                peaks[s["tokens"][i].strip() or repr(s["tokens"][i])] += 1
            row = {"hook": t.hook, "latent": t.latent, "peaks": peaks.most_common(6)}
            for style in ("v2", "v3"):
                t0 = time.perf_counter()
                row[style] = await ask(client, t, cfg.explain, style)
                row[style]["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"{t.hook} #{t.latent}  peaks {row['peaks'][:4]}\n   v2: {row['v2']['explanation']!r}"
                  f"{' (copied ' + str(row['v2']['copied']) + ')' if row['v2']['copied'] else ''}\n"
                  f"   v3: {row['v3']['explanation']!r}"
                  f"{' (copied ' + str(row['v3']['copied']) + ')' if row['v3']['copied'] else ''}", flush=True)
    finally:
        await client.aclose()
    return rows


def main(argv: list[str]) -> None:
    import torch

    from safesail.config import compose
    from safesail.interpret.explain import collected_hooks, load_tasks, strongest_candidates
    from safesail.logging_setup import setup_logging
    from safesail.rundir import RunDir

    out_path = None
    if "--out" in argv:
        i = argv.index("--out")
        out_path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    setup_logging("WARNING")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = compose(["device=cpu", *argv])
    rd = RunDir.from_cfg(cfg)
    top = int(cfg.explain.get("top_per_domain") or 3)
    chosen = strongest_candidates(rd, collected_hooks(rd), top, str(cfg.explain.get("rank") or "select"))
    tasks = [t for h in sorted(chosen) for t in load_tasks(rd, h, chosen[h])]
    t0 = time.perf_counter()
    rows = asyncio.run(run(cfg, tasks))
    for style in ("v2", "v3"):
        c = Counter(r[style]["status"] if r[style]["status"] == "ok" else r[style].get("reason") for r in rows)
        print(f"{style}: {dict(c)}; replies that copied first: {sum(bool(r[style]['copied']) for r in rows)}; "
              f"{sum(r[style]['seconds'] for r in rows):.0f} s")
    print(f"{len(rows)} latents, {time.perf_counter() - t0:.0f} s with model load")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1:])
