"""verify.sufficiency_prompts=open: the bundled open-ended prompts load, replace the twins as the neutral
queries of every domain (eval split) and of the strength scan (scan split); bad input is one sentence."""

from __future__ import annotations

import json

import pytest

from safesail.errors import UserError
from safesail.verify.prompts import load_open_prompts
from tests.verify.test_sufficiency_stats import _settings, _Tok


def test_the_bundled_open_prompts_load_in_every_demo_language_with_a_separate_scan_split():
    ps = load_open_prompts(None)
    ev = [p for p in ps if p.split == "eval"]
    scan = [p for p in ps if p.split == "scan"]
    for lang in ("en", "zh", "hi"):
        assert sum(p.lang == lang for p in ev) >= 8 and sum(p.lang == lang for p in scan) >= 1
    assert len({p.id for p in ps}) == len(ps)
    assert not {p.prompt for p in ev} & {p.prompt for p in scan}


@pytest.mark.parametrize("line, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"id": "a", "lang": "en", "split": "eval"}), "needs the text fields"),
    (json.dumps({"id": "a", "lang": "en", "split": "test", "prompt": "Hi"}), "split 'test'"),
])
def test_a_bad_prompts_line_is_one_sentence_naming_the_line(tmp_path, line, match):
    p = tmp_path / "p.jsonl"
    p.write_text("# a comment\n" + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=match) as e:
        load_open_prompts(p)
    assert "line 2" in str(e.value) and str(e.value).count(". ") == 0


def test_a_missing_file_a_repeated_id_or_no_eval_prompt_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_open_prompts(tmp_path / "nope.jsonl")
    rec = {"id": "a", "lang": "en", "split": "eval", "prompt": "Hi"}
    p = tmp_path / "dup.jsonl"
    p.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="repeats the id"):
        load_open_prompts(p)
    p.write_text(json.dumps(dict(rec, split="scan")) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="no eval prompts"):
        load_open_prompts(p)


def test_bad_settings_are_one_sentence():
    with pytest.raises(UserError, match="sufficiency_prompts is 'bogus'; use twins"):
        _settings(sufficiency_prompts="bogus")
    with pytest.raises(UserError, match="random_latents is 0"):
        _settings(random_latents=0)


def test_open_prompts_are_every_domains_neutral_queries_and_the_concept_queries_stay():
    from safesail.train.pairs import load_pairs
    from safesail.verify.stage import query_sets

    pairs = load_pairs(None)
    text = lambda ids: "".join(chr(i) for i in ids)
    kw = dict(queries_per_domain=6, sufficiency_queries=12, scan_queries=3, reference_pairs=10)
    twins, refs_t = query_sets(pairs, _settings(**kw), _Tok(), None)
    sets, refs = query_sets(pairs, _settings(sufficiency_prompts="open", **kw), _Tok(), None)
    ps = load_open_prompts(None)
    ev = {p.prompt: p.lang for p in ps if p.split == "eval"}
    sc = {p.prompt: p.lang for p in ps if p.split == "scan"}
    first = None
    for dom, qs in sets.items():
        assert qs.concept == twins[dom].concept and qs.langs == twins[dom].langs     # necessity, refusal unchanged
        assert refs[dom] == refs_t[dom]
        got = [text(q) for q in qs.neutral]
        assert len(got) == 12 and all(ev[g] == lang for g, lang in zip(got, qs.nlangs))
        assert [qs.nlangs.count(x) for x in ("en", "zh", "hi")] == [4, 4, 4]           # round robin over langs
        scan = [text(q) for q in qs.scan]
        assert len(scan) == 3 and all(sc[g] == lang for g, lang in zip(scan, qs.scan_langs))
        first = first or got
        assert got == first                                                          # the same for every domain


def test_too_few_open_prompts_in_the_languages_is_one_sentence(tmp_path):
    from safesail.train.pairs import load_pairs
    from safesail.verify.stage import query_sets

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"id": "a", "lang": "fr", "split": "eval", "prompt": "Dis-moi"}) + "\n", encoding="utf-8")
    s = _settings(sufficiency_prompts="open", open_prompts=str(p))
    with pytest.raises(UserError, match="holds 0 eval prompt"):
        query_sets(load_pairs(None), s, _Tok(), None)
