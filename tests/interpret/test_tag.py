"""Safety-domain tags: strict parsing of the LLM's answer, pair evidence, the combination rule."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from sim_fakes import FakeClient

from safesail.interpret.prompts.tag import TagParseError, parse_domains
from safesail.interpret.tag import combine, pair_evidence, pair_index, tag_all, tag_settings
from safesail.rundir import RunDir
from safesail.train.selection import pair_stats_path, save_tensors

HOOK = "layers.1.mlp_out"


@pytest.mark.parametrize("text,expected", [
    ('{"domains": []}', []),
    ('{"domains": ["terror", "Violence"]}', ["violence", "terror"]),
    ('```json\n{"domains": ["politics"]}\n```', ["politics"]),
    ('Answer: {"domains": ["pornography"]} done', ["pornography"]),
])
def test_parse_domains_accepts(text, expected):
    assert parse_domains(text) == expected


@pytest.mark.parametrize("text", [
    "", "violence", '{"domains": ["violence", "drugs"]}', '{"domains": "violence"}',
    '{"domains": ["violence"], "confidence": 1}', '{"domains": ["violence", "violence"]}',
    '{"domains": [1]}', '["violence"]', '{"tags": ["violence"]}', "{" * 50_000,
])
def test_parse_domains_refuses(text):
    with pytest.raises(TagParseError):
        parse_domains(text)


def _stats():
    # latent 5: fires on violence concepts much more than on their neutral twins; politics only weakly.
    # latent 7: fires equally on terror concepts and neutral twins (a general latent).
    t = {"latent_ids": torch.tensor([5, 7])}
    rows = {"politics": ([0.25, 0.0], [0.2, 0.0], [0.1, 0.0]),
            "pornography": ([0.0, 0.0], [0.0, 0.0], [0.0, 0.0]),
            "violence": ([0.8, 0.1], [0.1, 0.1], [2.5, 0.0]),
            "terror": ([0.3, 0.9], [0.0, 0.9], [-0.1, 0.01])}
    for d, (c, n, a) in rows.items():
        t[f"{d}.concept_rate"], t[f"{d}.neutral_rate"], t[f"{d}.mean_act_diff"] = (
            torch.tensor(c), torch.tensor(n), torch.tensor(a))
    return t


SETTINGS = {"rule": "both", "min_concept_rate": 0.2, "min_rate_diff": 0.15, "min_act_diff": 0.0,
            "use_llm": True, "concurrency": 2}


def test_pair_evidence_thresholds():
    stats = _stats()
    idx = pair_index(stats)
    ev5 = pair_evidence(stats, idx[5], SETTINGS)
    assert [d for d, e in ev5.items() if e["passes"]] == ["violence"]
    assert not ev5["politics"]["passes"]   # rate difference 0.05 < 0.15
    assert not ev5["terror"]["passes"]     # fires more often but weaker on average (act diff < 0)
    ev7 = pair_evidence(stats, idx[7], SETTINGS)
    assert not any(e["passes"] for e in ev7.values())
    assert ev5["violence"] == {"concept_rate": 0.8, "neutral_rate": 0.1, "mean_act_diff": 2.5, "passes": True}


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
    expls = {(HOOK, 5): {"hook": HOOK, "layer": 1, "latent": 5, "status": "ok", "explanation": "guns and shooting"},
             (HOOK, 7): {"hook": HOOK, "layer": 1, "latent": 7, "status": "ok", "explanation": "the word 'bomb'"},
             (HOOK, 9): {"hook": HOOK, "layer": 1, "latent": 9, "status": "failed", "explanation": None},
             (HOOK, 11): {"hook": HOOK, "layer": 1, "latent": 11, "status": "ok", "explanation": "elections"}}
    answers = {"guns": '{"domains": ["violence"]}', "bomb": '{"domains": ["terror", "violence"]}',
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
    assert tag_settings(smoke_cfg())["rule"] == "both"
