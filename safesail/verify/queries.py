"""The query sets of the verify stage: per domain the concept queries, the neutral queries steered and judged
(the concept pairs' neutral twins, or open-ended prompts: `prompts.py`), the strength scan's own queries and
the held-out reference pairs of the diff-in-means direction."""

from __future__ import annotations

from safesail.chat import encode_chat
from safesail.config_types import VerifyConfig
from safesail.errors import UserError
from safesail.verify.checks import QuerySet
from safesail.verify.prompts import by_lang as prompts_by_lang
from safesail.verify.prompts import load_open_prompts


def _round_robin(by_lang: dict[str, list], langs: list[str], n: int) -> list:
    """Up to n items taken from the front of the per-language lists, one language after the other."""
    out = []
    while len(out) < n and any(by_lang.get(x) for x in langs):
        for lang in langs:
            if by_lang.get(lang) and len(out) < n:
                out.append(by_lang[lang].pop(0))
    return out


def test_pairs(pairs, s: VerifyConfig, domain: str) -> list:
    """The domain's test pairs (their concept queries are necessity's, their neutral twins sufficiency's): the first
    max(queries_per_domain, sufficiency_queries) of its pairs, round robin over `s.langs`."""
    by_lang = {lang: [p for p in pairs if p.domain == domain and p.lang == lang] for lang in s.langs}
    n_test = max(s.queries_per_domain, int(s.sufficiency_queries or s.queries_per_domain))
    return _round_robin(by_lang, list(s.langs), n_test)


def query_sets(pairs, s: VerifyConfig, tok, system_prompt) -> tuple[dict[str, QuerySet], dict[str, tuple]]:
    """Per domain: the test queries (round robin over languages), the held-out reference pairs and, with a
    strength scan, `scan_queries` neutral queries of further pairs for it (round robin over languages).

    The concept queries are the first `queries_per_domain` test pairs; the neutral queries (steered and
    judged) the first `sufficiency_queries` (default: as many), so the first `queries_per_domain` neutral
    queries are the concept queries' twins. Reference and scan pairs are disjoint from the test pairs
    and from each other: the strength is not chosen on the queries it is judged on.

    With `sufficiency_prompts: open` the neutral queries (steered, judged) are the open prompts file's eval
    prompts and the scan's its scan prompts (round robin over languages), the same for every domain; the
    concept queries, their twins' places and the reference pairs are unchanged."""
    sets, refs = {}, {}
    opened = None
    if s.sufficiency_prompts == "open":
        ops = load_open_prompts(s.open_prompts)
        ev = _round_robin(prompts_by_lang(ops, "eval", list(s.langs)), list(s.langs), int(s.sufficiency_queries or
                                                                               s.queries_per_domain))
        sc = _round_robin(prompts_by_lang(ops, "scan", list(s.langs)), list(s.langs), s.scan_queries) if s.strength_scan else []
        if len(ev) < 2:
            raise UserError(f"{s.open_prompts} holds {len(ev)} eval prompt(s) in the languages {', '.join(s.langs)}; "
                            "give at least 2 (verify.langs picks the languages).")
        opened = ([x.prompt for x in ev], [x.lang for x in ev], [x.prompt for x in sc], [x.lang for x in sc])
    n_neutral = int(s.sufficiency_queries or s.queries_per_domain)
    enc = lambda q: encode_chat(tok, q, system_prompt)
    for dom in sorted({p.domain for p in pairs}):
        by_lang = {lang: [p for p in pairs if p.domain == dom and p.lang == lang] for lang in s.langs}
        test = test_pairs(pairs, s, dom)
        held = [p for p in pairs if p.domain == dom and p not in test][:s.reference_pairs]
        rest = {lang: [p for p in ps if p not in held and p not in test] for lang, ps in by_lang.items()}
        scan = _round_robin(rest, list(s.langs), s.scan_queries) if s.strength_scan else []
        concept, neutral = test[:s.queries_per_domain], test[:n_neutral]
        nq, nl = [p.neutral_query for p in neutral], [p.lang for p in neutral]
        sq, sl = [p.neutral_query for p in scan], [p.lang for p in scan]
        if opened is not None:
            nq, nl, sq, sl = opened
        sets[dom] = QuerySet(dom, [p.lang for p in concept], [enc(p.concept_query) for p in concept],
                             [enc(q) for q in nq], neutral_langs=list(nl), scan=[enc(q) for q in sq], scan_langs=list(sl))
        refs[dom] = ([enc(p.concept_query) for p in held], [enc(p.neutral_query) for p in held])
    return sets, refs
