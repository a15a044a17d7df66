"""Which candidate ranking finds latents whose top corpus tokens are about the domain (issue 13).

On a run where cache, train and select have run: the pair queries go through the source model once
and the chosen SAE at each hook encodes them (select's figures, swapped-word ones included); the
activation cache is encoded too, keeping each latent's top corpus activations. Then, side by side, the
latents each ranking would explain (the best N per domain over all hooks):

  session1  select's top 2 per hook by the distinguishing frequency f, then the smallest McNemar p
            (the session-1 demo: select.candidate_rank=freq, candidates_per_domain=2, explain.rank=mcnemar)
  mcnemar   the smallest McNemar p over all latents
  freq      the largest f
  word      the largest word_score (select.candidate_rank=word, explain.rank=select)

judged by an automatic proxy of "the top segments are about the domain": the share of the latent's
top-20 corpus activations whose token is one of the domain's swapped-in concept words (tokens of the
domain's concept queries that are absent from their twins and from every neutral query of the domain;
ASCII words of 3+ letters starting a word, or non-Latin pieces). Prints per ranking the mean proxy and
how many latents reach 0.5, and the latents with their top tokens for reading.

    python benchmarks/bench_candidates.py run.root=/tmp/cand/runs run.name=demo experiment=demo [--n 3] [--out c.json]
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOP = 20   # corpus activations per latent the proxy reads


def corpus_top(sae, folder, k: int):
    """Each latent's k largest codes on the cached corpus (non-special tokens), their token ids, density."""
    import torch

    from safesail.train.activation_store import load_shard

    top_v = top_t = None
    active, n_tok = None, 0
    for shard in sorted(folder.glob("w*.safetensors")):
        d = load_shard(shard)
        keep = ~d["special"]
        with torch.no_grad():
            c = sae.encode(d["activations"].float()).float() * keep.unsqueeze(1)
        tok = d["tokens"].long().unsqueeze(1).expand_as(c)
        if top_v is None:
            top_v, top_t = torch.zeros(k, c.shape[1]), torch.zeros(k, c.shape[1], dtype=torch.long)
            active = torch.zeros(c.shape[1])
        active += (c > 0).float().sum(0)
        n_tok += int(keep.sum())
        v, pos = torch.cat([top_v, c]).topk(k, dim=0)
        top_t = torch.cat([top_t, tok]).gather(0, pos)
        top_v = v
    return top_v, top_t, active / max(n_tok, 1)


def domain_vocab(tok, pairs, pa):
    """Per domain: normalised strings and (undecodable piece) ids of the concept queries' swapped tokens."""
    from safesail.train.contrastive import swapped_mask

    norm = lambda i: tok.decode([int(i)]).strip().lower()  # noqa: E731
    swapped = swapped_mask(pa.query_index, pa.token_ids, pa.n_queries).tolist()
    qi, ids = pa.query_index.tolist(), pa.token_ids.tolist()
    neutral = {}
    for q, x in zip(qi, ids):
        if q % 2:
            neutral.setdefault(pairs[q // 2].domain, set()).add(x)
    strings, pieces = {}, {}
    for q, x, sw in zip(qi, ids, swapped):
        if q % 2 or not sw:
            continue
        d, s, raw = pairs[q // 2].domain, norm(x), tok.decode([int(x)])
        bad = {norm(y) for y in neutral.get(d, ())}
        if "\ufffd" in s:
            if all(x not in v for v in neutral.values()):
                pieces.setdefault(d, set()).add(x)
        elif s and any(c.isalnum() for c in s) and s not in bad and (not s.isascii() or
                                                                     (raw.startswith(" ") and len(s) >= 3)):
            strings.setdefault(d, set()).add(s)
    return strings, pieces, norm


def main(argv: list[str]) -> None:
    import torch

    from safesail.config import compose
    from safesail.hooks import HookPoint
    from safesail.interpret.pair_evidence import mcnemar_p
    from safesail.logging_setup import setup_logging
    from safesail.models import load_model
    from safesail.rundir import RunDir
    from safesail.saes import load_sae
    from safesail.train import contrastive as C
    from safesail.train.pair_activations import capture_pair_activations
    from safesail.train.pairs import load_pairs
    from safesail.train.select_stage import SelectSettings, evaluate_sae
    from safesail.train.selection import chosen_sae_dirs

    opts = {}
    for flag in ("--n", "--out"):
        if flag in argv:
            i = argv.index(flag)
            opts[flag], argv = argv[i + 1], argv[:i] + argv[i + 2:]
    n_per = int(opts.get("--n", 3))
    setup_logging("WARNING")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = compose(["device=cpu", *argv])
    rd = RunDir.from_cfg(cfg)
    settings = SelectSettings.from_cfg(cfg)
    pairs = load_pairs(settings.pairs, settings.domains)
    dirs = chosen_sae_dirs(cfg, rd.root)
    t0 = time.perf_counter()
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.get("cache_dir"))
    tok = lm.tokenizer
    pa = capture_pair_activations(lm, pairs, [HookPoint.parse(h) for h in dirs], cfg.model.get("system_prompt"),
                                  batch_size=int(settings.batch_size), max_length=cfg.model.get("max_length"))
    del lm
    strings, pieces, norm = domain_vocab(tok, pairs, pa)
    hooks = {}
    for h, folder in dirs.items():
        sae = load_sae(folder).eval()
        _, stats = evaluate_sae(sae, pa.acts[h], pa.query_index, pa.n_queries, pairs, settings,
                                token_ids=pa.token_ids)
        top_v, top_t, density = corpus_top(sae, rd.root / "activations" / h, TOP)
        hooks[h] = {"stats": stats, "top_v": top_v, "top_t": top_t, "density": density}
    prep_s = time.perf_counter() - t0
    domains = [d for d in settings.domains if d in strings]

    def proxy(h, j, d):
        v, t = hooks[h]["top_v"][:, j], hooks[h]["top_t"][:, j]
        ok = [int(x) for x, a in zip(t.tolist(), v.tolist()) if a > 0]
        hit = sum(norm(x) in strings[d] or x in pieces.get(d, ()) for x in ok)
        return hit / len(ok) if ok else 0.0

    def ranked(name, d):
        rows = []
        for h, r in hooks.items():
            st = r["stats"]
            n = st.n_pairs[d]
            b, c = (st.distinguish[d] * n).round(), (st.reverse[d] * n).round()
            if name == "session1":
                ids = [x["latent"] for x in C.top_latents(st, d, 2, settings.candidate_min_freq, "freq")]
            elif name == "mcnemar":
                ids = torch.nonzero(b > c).flatten().tolist()
            else:
                ids = C.top_latents(st, d, n_per, settings.candidate_min_freq, name)
                ids = [x["latent"] for x in ids]
            for j in ids:
                key = mcnemar_p(int(b[j]), int(c[j])) if name in ("session1", "mcnemar") else \
                    -float((st.word_score if name == "word" else st.freq)[d][j])
                rows.append((key, -float(st.freq[d][j]), h, j))
        return [(h, j) for _, _, h, j in sorted(rows)[:n_per]]

    report = {"n_per_domain": n_per, "prep_s": round(prep_s, 1), "rankings": {}}
    print(f"{len(pairs)} pairs, {len(dirs)} hooks; pairs forward + SAE and corpus encodes {prep_s:.0f} s; "
          f"top {n_per} per domain; proxy: share of the top-{TOP} corpus tokens that are domain concept words")
    print("| ranking | " + " | ".join(f"{d} mean / >=0.5" for d in domains) + " | mean | >=0.5 |")
    print("|---|" + "---|" * (len(domains) + 2))
    for name in ("session1", "mcnemar", "freq", "word"):
        per, lat = {}, {}
        for d in domains:
            got = [(h, j, proxy(h, j, d)) for h, j in ranked(name, d)]
            lat[d] = [{"hook": h, "latent": j, "proxy": round(p, 2),
                       "density": round(float(hooks[h]["density"][j]), 4),
                       "top_tokens": [tok.decode([int(x)]) for x, a in zip(hooks[h]["top_t"][:12, j].tolist(),
                                                                       hooks[h]["top_v"][:12, j].tolist()) if a > 0]}
                      for h, j, p in got]
            ps = [p for _, _, p in got]
            per[d] = (sum(ps) / max(len(ps), 1), sum(p >= 0.5 for p in ps))
        report["rankings"][name] = {"per_domain": per, "latents": lat}
        mean = sum(m for m, _ in per.values()) / len(per)
        print(f"| {name} | " + " | ".join(f"{m:.2f} / {k}" for m, k in per.values()) +
              f" | {mean:.2f} | {sum(k for _, k in per.values())} |")
    for name in ("session1", "word"):
        print(f"\n{name}:")
        for d, lst in report["rankings"][name]["latents"].items():
            for x in lst:
                print(f"  {d:12s} {x['hook']} #{x['latent']:<5d} proxy {x['proxy']:.2f} density {x['density']:.4f}  "
                      + " ".join(repr(t) for t in x["top_tokens"][:10]))
    if "--out" in opts:
        with open(opts["--out"], "w") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1:])
