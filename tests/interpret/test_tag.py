"""Safety-domain tags: strict parsing of the LLM's answer, pair evidence, the combination rule."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from sim_fakes import FakeClient

from safesail.interpret.prompts.tag import TagParseError, parse_domains
from safesail.interpret.tag import combine, pair_evidence, pair_index, tag_all, tag_settings
from safesail.rundir import RunDir
from safesail.train.selection import SELECTION_VERSION, pair_stats_path, save_tensors, write_selection

HOOK = "layers.1.mlp_out"


@pytest.mark.parametrize("text,expected", [
    ("Domains: none", []), ("Domains: violence, terror", ["violence", "terror"]), ("none", []),
    ("domains: Terror and violence.", ["violence", "terror"]), ("Domains: porn", ["pornography"]),
    ('{"domains": []}', []), ('{"domains": ["terror", "Violence"]}', ["violence", "terror"]),
    ('```json\n{"domains": ["politics"]}\n```', ["politics"]), ("violence", ["violence"]),
    ("Domains: politics\nExplanation: the latent ...", ["politics"]),
])
def test_parse_domains_accepts(text, expected):
    assert parse_domains(text) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "Domains: violence, drugs", '{"domains": ["violence", "drugs"]}', '{"domains": "violence"}',
    '{"domains": ["violence"], "confidence": 1}', "Domains: violence, violence", '{"domains": [1]}',
    '{"tags": ["violence"]}', "{" * 50_000, "I think it is about politics", '{"domains": [',
])
def test_parse_domains_refuses(text):
    with pytest.raises(TagParseError):
        parse_domains(text)


def test_tag_prompt_shows_explanation_and_bracketed_excerpts():
    from safesail.interpret.prompts.tag import excerpt_texts, tag_messages

    segs = [{"tokens": [" victims", " of", " violence"], "acts": [0.5, 0.0, 4.0]}]
    msgs = tag_messages("victims of violence", excerpt_texts(segs, 4.0))
    assert msgs[-1]["content"] == "Explanation: victims of violence\nExcerpt 1: victims of [violence]\nWhich domains?"
    # every worked answer is in the reply format the parser takes
    assert all(parse_domains(m["content"]) is not None for m in msgs if m["role"] == "assistant")


N_PAIRS = {"politics": 20, "pornography": 20, "violence": 20, "terror": 20}


def _stats():
    # latent 5: fires on violence concepts much more than on their neutral twins; politics only weakly.
    # latent 7: fires equally on terror concepts and neutral twins (a general latent).
    t = {"latent_ids": torch.tensor([5, 7])}
    # (concept_rate, neutral_rate, concept-only share, twin-only share, mean act diff) per latent
    rows = {"politics": ([0.25, 0.0], [0.2, 0.0], [0.1, 0.0], [0.05, 0.0], [0.1, 0.0]),
            "pornography": ([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]),
            "violence": ([0.8, 0.1], [0.1, 0.1], [0.7, 0.05], [0.0, 0.05], [2.5, 0.0]),
            "terror": ([0.3, 0.9], [0.0, 0.9], [0.3, 0.05], [0.0, 0.05], [-0.1, 0.01])}
    for d, (c, n, dd, r, a) in rows.items():
        for name, v in zip(("concept_rate", "neutral_rate", "distinguish_rate", "reverse_rate", "mean_act_diff"),
                           (c, n, dd, r, a)):
            t[f"{d}.{name}"] = torch.tensor(v)
    return t


SETTINGS = {"rule": "both", "alpha": 0.01, "min_concept_rate": 0.2, "min_rate_diff": 0.15, "min_act_diff": 0.0,
            "use_llm": True, "segments": 3, "segment_tokens": 24, "max_tokens": 16, "concurrency": 2}


def test_pair_evidence_is_a_paired_test_with_an_effect_size():
    stats = _stats()
    idx = pair_index(stats)
    ev5 = pair_evidence(stats, idx[5], SETTINGS, N_PAIRS)
    assert [d for d, e in ev5.items() if e["passes"]] == ["violence"]
    assert not ev5["politics"]["passes"]   # 2 concept-only vs 1 twin-only pair: p = 0.5, rate diff 0.05
    assert ev5["politics"]["p_value"] == 0.5
    assert not ev5["terror"]["passes"]     # significant (6 vs 0 pairs, p = 1/64) but weaker on average
    v = ev5["violence"]
    assert (v["concept_only"], v["neutral_only"]) == (14, 0) and v["p_value"] == pytest.approx(2 ** -14, rel=1e-3)
    assert v["effect"] == 0.7 and v["cohen_h"] == pytest.approx(2 * (math.asin(0.8 ** .5) - math.asin(0.1 ** .5)),
                                                                 abs=1e-4)
    ev7 = pair_evidence(stats, idx[7], SETTINGS, N_PAIRS)
    assert not any(e["passes"] for e in ev7.values())
    # a strong rate difference on too few pairs is not significant
    few = pair_evidence(stats, idx[5], SETTINGS, {**N_PAIRS, "violence": 4})
    assert few["violence"]["concept_only"] == 3 and not few["violence"]["passes"]


def test_exact_mcnemar():
    from safesail.interpret.pair_evidence import mcnemar_p

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_p(3, 3) == pytest.approx(42 / 64) and mcnemar_p(0, 4) == 1.0


def test_combination_rules():
    pairs = {"violence": {"passes": True}, "terror": {"passes": False}}
    llm = {"domains": ["terror", "violence"], "status": "ok"}
    assert combine(llm, pairs, "both")[0] == ["violence"]
    assert combine(llm, pairs, "either")[0] == ["violence", "terror"]
    assert combine(llm, pairs, "pairs_only")[0] == ["violence"]
    assert combine(llm, pairs, "llm_only")[0] == ["violence", "terror"]
    # no pair statistics: the LLM alone, and the record says so
    tags, basis = combine(llm, None, "both")
    assert tags == ["violence", "terror"] and "no pair statistics" in basis
    # an unparsable LLM answer is no evidence
    assert combine({"domains": [], "status": "unparsable"}, pairs, "either")[0] == ["violence"]
    assert combine({"domains": [], "status": "unparsable"}, None, "both")[0] == []


def test_tag_all_on_a_hand_made_run(tmp_path):
    rd = RunDir(tmp_path / "run")
    save_tensors(pair_stats_path(rd.root, HOOK), _stats())
    write_selection(rd.root, {"version": SELECTION_VERSION, "chosen": {}, "pairs": {"by_domain": N_PAIRS}})
    expls = {(HOOK, 5): {"hook": HOOK, "layer": 1, "latent": 5, "status": "ok", "explanation": "guns and shooting"},
             (HOOK, 7): {"hook": HOOK, "layer": 1, "latent": 7, "status": "ok", "explanation": "the word 'bomb'"},
             (HOOK, 9): {"hook": HOOK, "layer": 1, "latent": 9, "status": "failed", "explanation": None},
             (HOOK, 11): {"hook": HOOK, "layer": 1, "latent": 11, "status": "ok", "explanation": "elections"}}
    answers = {"guns": "Domains: violence", "bomb": '{"domains": ["terror", "violence"]}',
               "elections": "I think politics"}

    def reply(req):
        desc = req.messages[-1]["content"]
        return next(v for k, v in answers.items() if k in desc)

    client = FakeClient(logprobs=False, reply=reply)
    summary = asyncio.run(tag_all(rd, SETTINGS, client, expls, sorted(expls)))
    recs = {r["latent"]: r for r in map(json.loads, (rd.interpret / "tags.jsonl").read_text().splitlines())}
    assert recs[5]["tags"] == ["violence"]                     # LLM and pairs agree
    assert recs[7]["tags"] == []                               # LLM says so, pairs do not: "both" refuses
    assert recs[7]["evidence"]["llm"]["domains"] == ["violence", "terror"]
    assert recs[9]["evidence"]["llm"]["status"] == "no_explanation" and recs[9]["tags"] == []
    assert recs[11]["evidence"]["pairs"] is None and recs[11]["evidence"]["llm"]["status"] == "unparsable"
    assert recs[11]["evidence"]["llm"]["raw"] == "I think politics"
    assert recs[5]["thresholds"]["rule"] == "both" and recs[5]["evidence"]["pairs"]["violence"]["passes"]
    assert summary["tagged"] == 1 and summary["with_pairs"] == 2
    assert len(client.calls) == 3                              # no call for the failed explanation
    # resumable: a second pass over the same inputs calls nothing and writes nothing
    n_lines = len((rd.interpret / "tags.jsonl").read_text().splitlines())
    asyncio.run(tag_all(rd, SETTINGS, client, expls, sorted(expls)))
    assert len(client.calls) == 3
    assert len((rd.interpret / "tags.jsonl").read_text().splitlines()) == n_lines


def test_tag_settings_refuse_an_unknown_rule(smoke_cfg):
    from safesail.errors import UserError

    with pytest.raises(UserError):
        tag_settings(smoke_cfg("tag.rule=majority"))
    assert tag_settings(smoke_cfg())["rule"] == "pairs_only"   # chosen by bench_tag_rule (BENCHMARKS.md)
