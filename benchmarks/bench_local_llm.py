"""The local LLM back end on a simulation workload: the previous back end vs the prefix-cached one.

Workload (what `safesail score` asks of the simulator, logprobs mode): per latent, its
score segments (text from the bundled corpus, `--seg-tokens` tokens each) packed
`--per-call` to a prompt by the scorer's own `logprob_prompt_many`, once with the
latent's explanation and once with another latent's (the shuffled control). All calls of
a latent are issued together and `--concurrency` latents at a time, as the score stage does.

* baseline: the previous back end's computation, one uncached forward pass per prompt,
  full-vocabulary log-softmax, one prompt at a time (what `LocalClient.prompt_logprobs`
  did before the prefix cache);
* prefix-cached: `LocalClient` (shared prompt prefixes computed once, batched prefill).

Both are timed on the same prompts in the same process, side by side (baseline first,
then the cached back end from an empty prefix cache), and their log-probabilities are
compared. Prints one JSON object per model: prompt tokens/s, latents/hour, the max
difference, the share of prompt tokens the cache saved.

    python benchmarks/bench_local_llm.py --llm qwen-coder-0.5b qwen-coder-1.5b --latents 3 --threads 1
    python benchmarks/bench_local_llm.py --llm qwen-coder-0.5b --latents 2 --threads 1 2 --skip-baseline
    python benchmarks/bench_local_llm.py --llm qwen-coder-0.5b --latents 8 --generate   # explain-like generation
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import torch

EXPLANATIONS = ["mentions of guns and other weapons", "dates and years in historical text",
                "words about cooking and food", "greetings at the start of a letter",
                "names of cities and countries", "verbs describing physical violence"]


def corpus_segments(tokenizer, n: int, seg_tokens: int) -> list[list[str]]:
    """n segments of seg_tokens token strings from the bundled English corpus."""
    from safesail.models.tiny import DATA_DIR
    from safesail.token_text import token_pieces

    segs = []
    with open(DATA_DIR / "corpus" / "text_en.jsonl", encoding="utf-8") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids) - seg_tokens, seg_tokens * 3):
                segs.append(token_pieces(tokenizer, ids[i:i + seg_tokens]))
                if len(segs) == n:
                    return segs
    raise SystemExit("the bundled corpus is too small for that many segments")


def workload(tokenizer, latents: int, per_latent: int, per_call: int, seg_tokens: int, scale_max: int):
    """[[prompt, ...] per latent]: own explanation and shuffled control, segments packed per call."""
    from safesail.interpret.scoring.prompts.simulation import logprob_prompt_many

    segs = corpus_segments(tokenizer, latents * per_latent, seg_tokens)
    out = []
    for j in range(latents):
        mine = segs[j * per_latent:(j + 1) * per_latent]
        prompts = []
        for expl in (EXPLANATIONS[j % len(EXPLANATIONS)], EXPLANATIONS[(j + 1) % len(EXPLANATIONS)]):
            for i in range(0, per_latent, per_call):
                prompts.append(logprob_prompt_many(expl, mine[i:i + per_call], scale_max)[0])
        out.append(prompts)
    return out


def baseline(model, tokenizer, prompts: list[str], cand: list[int]) -> list[torch.Tensor]:
    """The previous back end: one full uncached forward pass per prompt."""
    res = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            res.append(torch.log_softmax(logits.float(), dim=-1)[:, cand])
    return res


async def cached(client, work: list[list[str]], names: list[str], concurrency: int, slots: bool):
    sem = asyncio.Semaphore(concurrency)
    kw = {"slots_ending_with": "\t"} if slots else {}

    async def latent(prompts):
        async with sem:
            return await asyncio.gather(*(client.prompt_logprobs(p, names, **kw) for p in prompts))

    out = await asyncio.gather(*(latent(w) for w in work))
    await client.aclose()
    return [r for rs in out for r in rs]


def slot_differences(got, ref, names) -> tuple[float, float]:
    """Largest |difference| at the simulator's slots (tokens ending in TAB): candidate log-probabilities,
    and the expected answer the simulator reads from them."""
    vals = torch.tensor([float(c) for c in names])
    lp, ev = 0.0, 0.0
    for r, x in zip(got, ref):
        slots = [i for i, t in enumerate(r.tokens) if t.endswith("\t")]
        mine = torch.tensor([[r.next_logprobs[i][c] for c in names] for i in slots])
        theirs = x[slots]
        lp = max(lp, float((mine - theirs).abs().max()))
        e = lambda m: (torch.softmax(m, dim=-1) * vals).sum(-1)  # noqa: E731
        ev = max(ev, float((e(mine) - e(theirs)).abs().max()))
    return lp, ev


SYSTEM = ("You explain what a latent (a feature inside a language model) responds to. You see text "
          "snippets where it fires, the top token in [brackets]. Reply with a short noun phrase naming "
          "the concept, not a sentence about the latent. Examples: 'dates and years', 'cooking verbs', "
          "'greetings that open a letter', 'negation words'.")


def generation(llm: str, a) -> list[dict]:
    """Explain-like requests (shared system prompt, 4 at once): HF generate, left-padded batch (the
    previous back end) vs the engine's prefix-cached batched decoding; same greedy tokens expected."""
    from safesail.config import compose
    from safesail.interpret.clients.base import ChatRequest
    from safesail.interpret.clients.local import LocalClient
    from safesail.interpret.clients.local_engine import release_engines

    cfg = compose([f"llm={llm}", "llm.threads=keep", "llm.batch_size=4"])
    client = LocalClient.from_cfg(cfg.llm, device="cpu")
    tok = client.tokenizer
    torch.set_num_threads(a.threads[0])
    segs = corpus_segments(tok, 4 * a.latents, a.seg_tokens)
    reqs = []
    for j in range(a.latents):
        shown = ["".join(s) for s in segs[4 * j:4 * j + 4]]
        reqs.append(ChatRequest([{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": "\n".join(f"- {t}" for t in shown)}],
                                max_tokens=a.new_tokens))
    ids = [client.encode_messages(r.messages) for r in reqs]
    pad = tok.pad_token_id
    with torch.no_grad():  # warm-up: the first bf16 matmuls of a process are slow for either back end
        client.model.generate(input_ids=torch.tensor([ids[0]]), max_new_tokens=2, do_sample=False, pad_token_id=pad)
    t0 = time.perf_counter()
    old = []
    with torch.no_grad():
        for i in range(0, len(ids), 4):
            chunk = ids[i:i + 4]
            width = max(map(len, chunk))
            x = torch.full((len(chunk), width), pad)
            m = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, row in enumerate(chunk):
                x[r, width - len(row):] = torch.tensor(row)
                m[r, width - len(row):] = 1
            out = client.model.generate(input_ids=x, attention_mask=m, max_new_tokens=a.new_tokens, do_sample=False,
                                        pad_token_id=pad)
            for row in out[:, width:].tolist():
                n = next((k for k, t in enumerate(row) if t in client._stop_ids), len(row))
                old.append(tok.decode(row[:n], skip_special_tokens=True))
    base_s = time.perf_counter() - t0

    async def new_all():
        res = await asyncio.gather(*(client.chat(r) for r in reqs))
        await client.aclose()
        return res
    t0 = time.perf_counter()
    new = asyncio.run(new_all())
    new_s = time.perf_counter() - t0
    n_prompt = sum(map(len, ids))
    same = sum(o == c.text for o, c in zip(old, new))
    rows = [{"llm": llm, "workload": "explain-like generation", "backend": "HF generate, left-padded batches of 4",
             "seconds": round(base_s, 1), "latents_per_hour": round(a.latents * 3600 / base_s, 1)},
            {"llm": llm, "workload": "explain-like generation", "backend": "prefix-cached batched decoding",
             "seconds": round(new_s, 1), "latents_per_hour": round(a.latents * 3600 / new_s, 1),
             "speedup_vs_baseline": round(base_s / new_s, 2), "same_text": f"{same}/{len(reqs)}",
             "example": new[0].text}]
    for r in rows:
        r.update(requests=len(reqs), prompt_tokens=n_prompt, new_tokens=a.new_tokens, threads=a.threads[0],
                 load_avg=[round(x, 1) for x in os.getloadavg()])
        print(json.dumps(r, ensure_ascii=False), flush=True)
    del client
    release_engines()
    return rows


def run_model(llm: str, a) -> list[dict]:
    from safesail.config import compose
    from safesail.interpret.clients.local import LocalClient
    from safesail.interpret.clients.local_engine import release_engines
    from safesail.interpret.scoring.simulator import single_token_scale

    rows = []
    cfg = compose([f"llm={llm}", "llm.threads=keep", f"llm.batch_size={a.batch_size}"])
    t0 = time.perf_counter()
    client = LocalClient.from_cfg(cfg.llm, device="cpu")
    load_s = time.perf_counter() - t0
    tok = client.tokenizer
    scale = single_token_scale(client, 10)
    names = [str(v) for v in range(scale + 1)]
    cand = [tok(c, add_special_tokens=False)["input_ids"][0] for c in names]
    work = workload(tok, a.latents, a.segments, a.per_call, a.seg_tokens, scale)
    flat = [p for w in work for p in w]
    n_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in flat)
    ref = None
    if not a.skip_baseline:
        torch.set_num_threads(a.threads[0])
        t0 = time.perf_counter()
        ref = baseline(client.model, tok, flat, cand)
        base_s = time.perf_counter() - t0
        rows.append({"llm": llm, "backend": "baseline (uncached, one prompt at a time)", "threads": a.threads[0],
                     "seconds": round(base_s, 1), "prompt_tokens_per_s": round(n_tokens / base_s, 1),
                     "latents_per_hour": round(a.latents * 3600 / base_s, 1)})
    for threads, slots in [(t, s) for t in a.threads for s in ((False, True) if a.both else (True,))]:
        torch.set_num_threads(threads)
        client.engine.cache.clear()
        before = client.engine.stats.computed_tokens, client.engine.stats.prompt_tokens
        t0 = time.perf_counter()
        got = asyncio.run(cached(client, work, names, a.concurrency, slots))
        s = time.perf_counter() - t0
        computed = client.engine.stats.computed_tokens - before[0]
        asked = client.engine.stats.prompt_tokens - before[1]
        row = {"llm": llm, "backend": "prefix-cached + batched" + (", slots only" if slots else ""),
               "threads": threads, "seconds": round(s, 1),
               "prompt_tokens_per_s": round(n_tokens / s, 1), "latents_per_hour": round(a.latents * 3600 / s, 1),
               "computed_share": round(computed / asked, 3), "batches": client.batches[-len(flat):]}
        if ref is not None:
            lp_diff, ev_diff = slot_differences(got, ref, names)
            row["max_abs_logprob_diff_at_slots"] = round(lp_diff, 4)
            row["max_abs_expected_value_diff"] = round(ev_diff, 4)
            row["speedup_vs_baseline"] = round(rows[0]["seconds"] / s, 2)
        rows.append(row)
    for r in rows:
        r.update(prompts=len(flat), prompt_tokens=n_tokens, latents=a.latents, load_s=round(load_s, 1),
                 load_avg=[round(x, 1) for x in os.getloadavg()])
        print(json.dumps(r), flush=True)
    del client
    release_engines()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", nargs="+", default=["qwen-coder-0.5b"])
    ap.add_argument("--latents", type=int, default=3)
    ap.add_argument("--segments", type=int, default=8, help="score segments per latent")
    ap.add_argument("--per-call", type=int, default=4, help="segments per prompt (score.segments_per_call)")
    ap.add_argument("--seg-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--both", action="store_true", help="also time the cached back end computing every position")
    ap.add_argument("--generate", action="store_true", help="time explain-like generation instead of simulation")
    ap.add_argument("--new-tokens", type=int, default=16)
    a = ap.parse_args()
    print(json.dumps({"uptime_load": [round(x, 1) for x in os.getloadavg()], "cores": os.cpu_count()}))
    for llm in a.llm:
        (generation if a.generate else run_model)(llm, a)


if __name__ == "__main__":
    main()
