"""Which SAE latents WRITE a safety domain? A screen for latents to steer (issue 15, session 10).

The tagged latents are chosen by what they READ: their top segments, the explanation of them, their pair
evidence. Nine sessions of `safesail verify` found that on SmolLM2-135M such latents, added at one MLP output,
do not make the answer about their domain (at most 3 of 14 beat the random latent), while the domain's
diff-in-means direction at the same norm does (L7 politics, L7 violence). The literature's reading (Arad,
Mueller & Belinkov 2025: input vs output features) is that a latent steers when its decoder writes the concept,
which a latent that fires on the concept need not do. This script screens EVERY latent of each chosen SAE by
what its decoder row writes, two ways, per (hook, domain):

- `lexicon`: the direct logit effect of the decoder row (through the final norm's gain and the unembedding):
  how many of the domain's lexicon tokens are among its `--rank` most promoted tokens (ties: their mean z-score
  over the vocabulary). The lexicon: the single-token forms (' word', ' Word') of each English word
  of the `concept` names of the domain's bundled pairs that are NOT verify's test pairs (so no word of a judged
  query picks a latent), lower-case with a leading space, words of 4+ letters that no neutral twin contains;
- `measured`: the mean change (nats) of the next token's probability mass on the lexicon when the latent's unit
  decoder row x `--strength` R is added at every position of reference pairs' neutral queries (through the rest
  of the model, as verify steers), for a pool of each (hook, domain): the top `--pool` of the lexicon screen at
  rank 1000 and of the dim screen (the direct logit path alone says little before the last layers);
- `dim`: the cosine of the decoder row with the domain's diff-in-means direction at that hook (the reference
  direction `safesail verify` steers with, from its held-out reference pairs).

It prints the top latents of each screen with their top promoted tokens and writes their ids as a
`verify.latents` list (`--out`), to be checked with the stage's own criterion on a COPY of the run:

    python benchmarks/bench_writer_latents.py --run /tmp/s10/copy/demo --top 2 --out /tmp/s10/writers.json
    safesail verify run.root=/tmp/s10/copy run.name=demo experiment=demo verify.reference=false \
        "verify.latents=$(python -c 'import json; print(json.dumps(json.load(open("/tmp/s10/writers.json"))["ids"]))')"
    python benchmarks/bench_verify_power.py --run /tmp/s10/copy/demo
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch


def lexicon(pairs, test_ids: set[str], domain: str) -> list[str]:
    """Lower-case English words (4+ letters) of the domain's non-test pairs' concept names that no neutral twin holds."""
    neutral = " ".join(p.neutral_query.lower() for p in pairs)
    words: list[str] = []
    for p in pairs:
        if p.domain != domain or p.lang != "en" or p.id in test_ids:
            continue
        for w in re.findall(r"[a-z]{4,}", (p.concept or "").lower()):
            if w not in words and not re.search(rf"\b{w}", neutral):
                words.append(w)
    return words


def lexicon_tokens(tok, words: list[str]) -> list[int]:
    """The token of ' word' and of ' Word' where it is ONE token (a word split into pieces would put generic heads
    such as ' counter' or ' only' into the lexicon)."""
    ids = []
    for w in words:
        for form in (w, w.capitalize()):
            t = tok(" " + form, add_special_tokens=False)["input_ids"]
            if len(t) == 1 and t[0] not in ids:
                ids.append(int(t[0]))
    return ids


def direct_logits(model, W_dec: torch.Tensor) -> torch.Tensor:
    """[n_latents, vocab]: each decoder row through the final norm's gain and the unembedding, z-scored per row."""
    W_U = model.get_output_embeddings().weight.detach().float()
    norm = getattr(getattr(model, "model", model), "norm", None)
    v = W_dec.float()
    if norm is not None and getattr(norm, "weight", None) is not None:
        v = v * norm.weight.detach().float()
    out = []
    for chunk in v.split(512):
        d = chunk @ W_U.T
        out.append((d - d.mean(1, keepdim=True)) / d.std(1, keepdim=True).clamp_min(1e-6))
    return torch.cat(out)


def _steerable(rd, hook: str, folder):
    """The hook's SAE with its collected quantiles, or without them before `safesail collect` has run."""
    from safesail.errors import UserError
    from safesail.hooks import HookPoint
    from safesail.saes import load_sae
    from safesail.verify.interventions import SteerableSAE
    from safesail.verify.stage import load_steerable

    try:
        return load_steerable(rd, hook, folder, "cpu")
    except UserError:
        return SteerableSAE(HookPoint.parse(hook), load_sae(folder).eval().requires_grad_(False), {})


def lexicon_hits(z: torch.Tensor, lex: list[int], rank: int) -> torch.Tensor:
    """[n_latents]: how many lexicon tokens are among each row's `rank` most promoted tokens (by chance:
    len(lex) x rank / vocab, ~0.2 for 48 tokens in the top 200 of 49k), ties broken by their mean z-score."""
    top = z.topk(rank, dim=1).indices
    hits = torch.isin(top, torch.tensor(lex)).sum(1).float()
    return hits + 0.01 * z[:, lex].mean(1).clamp(-50, 50)


def measured_lexicon_gain(v, sae, latents: list[int], prompts: list[list[int]], lex: list[int], norm: float,
                          base: torch.Tensor) -> torch.Tensor:
    """[len(latents)]: the mean change (nats) of the next token's probability mass on the lexicon when each
    latent's unit decoder row x `norm` is added at every position of `prompts` (through the whole rest of the
    model: what verify's steering does to the first answer token)."""
    from safesail.verify.interventions import DirectionEdit, Intervention, scaled

    mass = lambda lp: torch.logsumexp(lp[:, lex], dim=1)
    ivs = [Intervention([sae], direction_edits=[DirectionEdit(sae.hook.layer, scaled(sae.direction(i).float(), norm))])
           for i in latents]
    got = v.next_logprobs_many([(prompts, iv) for iv in ivs])
    return torch.stack([(mass(lp) - mass(base)).mean() for lp in got])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory with trained, selected SAEs")
    ap.add_argument("--set", nargs="*", default=["experiment=demo"], help="config overrides the run was made with")
    ap.add_argument("--top", type=int, default=2, help="latents per (hook, domain) and screen")
    ap.add_argument("--rank", type=int, default=200, help="lexicon screen: promoted tokens counted per latent")
    ap.add_argument("--screens", nargs="+", default=["lexicon", "dim"], choices=["lexicon", "dim", "measured"])
    ap.add_argument("--pool", type=int, default=40, help="measured: the top of the lexicon (at rank 1000) and dim "
                                                          "screens each give this many latents per (hook, domain)")
    ap.add_argument("--strength", type=float, default=0.35, help="measured: added norm, x the residual norm R")
    ap.add_argument("--prompts", type=int, default=8, help="measured: reference pairs' neutral queries steered")
    ap.add_argument("--out", default=None, help="JSON: the ids (verify.latents) and each screen's table")
    args = ap.parse_args(argv)

    from safesail.config import compose
    from safesail.domains import DOMAINS
    from safesail.models import load_model
    from safesail.rundir import RunDir
    from safesail.train.pairs import load_pairs
    from safesail.train.selection import chosen_sae_dirs
    from safesail.verify.directions import diffs_in_means
    from safesail.verify.queries import test_pairs
    from safesail.verify.stage import VerifySettings, query_sets

    root = Path(args.run)
    cfg = compose([f"run.root={root.parent}", f"run.name={root.name}", *args.set])
    s = VerifySettings.from_cfg(cfg)
    rd = RunDir.from_cfg(cfg)
    try:
        sae_dirs = chosen_sae_dirs(cfg, rd.root)
    except Exception as e:        # noqa: BLE001  (a run without select: say so)
        print(f"{root}: no chosen SAEs ({e}); run `safesail select` first", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    lm = load_model(cfg.model, "cpu", cache_dir=cfg.get("cache_dir"))
    saes = {h: _steerable(rd, h, f) for h, f in sae_dirs.items()}
    pairs = load_pairs(cfg.select.get("pairs"))
    _, refs = query_sets(pairs, s, lm.tokenizer, cfg.model.get("system_prompt"))
    test_ids = {p.id for d in DOMAINS for p in test_pairs(pairs, s, d)}
    lex = {d: lexicon(pairs, test_ids, d) for d in DOMAINS}
    lex_ids = {d: lexicon_tokens(lm.tokenizer, w) for d, w in lex.items()}
    tok = lm.tokenizer
    points = [saes[h].hook for h in saes]
    dims = ({d: diffs_in_means(lm, points, refs[d][0], refs[d][1]) for d in DOMAINS}
            if {"dim", "measured"} & set(args.screens) else {})
    if "measured" in args.screens:
        from safesail.verify.checks import Verifier
        from safesail.verify.generation import residual_norms

        v = Verifier(lm, s.checks(), None)
        mprompts = {d: refs[d][1][:args.prompts] for d in DOMAINS}
        mbase = {d: v.next_logprobs(mprompts[d]) for d in DOMAINS}
        R = residual_norms(lm, points, [q for d in DOMAINS for q in mprompts[d]])
    ids, table = [], []
    for hook in sorted(saes, key=lambda h: saes[h].hook.layer):
        st = saes[hook]
        W = st.sae.W_dec.detach().float()
        unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)
        z = direct_logits(lm.model, W) if {"lexicon", "measured"} & set(args.screens) else None
        for d in DOMAINS:
            scores = {}
            if "lexicon" in args.screens:
                scores["lexicon"] = lexicon_hits(z, lex_ids[d], args.rank)
            if {"dim", "measured"} & set(args.screens):
                dv = dims[d][st.hook.name].float()
                cos = unit @ (dv / dv.norm().clamp_min(1e-8))
                if "dim" in args.screens:
                    scores["dim"] = cos
            if "measured" in args.screens:
                pool = list(dict.fromkeys(lexicon_hits(z, lex_ids[d], 1000).topk(args.pool).indices.tolist()
                                          + cos.topk(args.pool).indices.tolist()))
                gain = measured_lexicon_gain(v, st, pool, mprompts[d], lex_ids[d], args.strength * R[hook],
                                             mbase[d])
                scores["measured"] = torch.full((W.shape[0],), -1e9).index_put_((torch.tensor(pool),), gain)
            for screen, sc in scores.items():
                for i in sc.topk(args.top).indices.tolist():
                    lid = f"{st.hook.layer}_{i}:{d}"
                    promoted = [tok.decode([int(t)]) for t in (z[i] if z is not None else
                                                               direct_logits(lm.model, W[i:i + 1])[0]).topk(8).indices]
                    row = {"id": lid, "hook": hook, "latent": i, "domain": d, "screen": screen,
                           "score": round(float(sc[i]), 4), "collected": i in st.scales,
                           "lexicon_z": round(float(z[i, lex_ids[d]].mean()), 3) if z is not None else None,
                           "promoted": promoted}
                    table.append(row)
                    if lid not in ids:
                        ids.append(lid)
                    print(f"{screen:8s} {lid:28s} {row['score']:+.3f}  collected={row['collected']!s:5s} "
                          f"promoted: {' | '.join(promoted)}")
    print(f"\nlexicons: " + "; ".join(f"{d}: {len(lex_ids[d])} tokens ({', '.join(lex[d][:8])}...)" for d in DOMAINS))
    print(f"{len(ids)} latents in {time.perf_counter() - t0:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"ids": ids, "lexicons": lex, "table": table}, indent=1,
                                             ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
