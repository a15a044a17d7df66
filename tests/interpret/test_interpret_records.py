"""Typed interpret records (safesail/interpret/records.py): one reader and one writer per file."""

import json

import pytest
import torch

from safesail.errors import UserError
from safesail.interpret.records import (ExplanationRecord, TagRecord, explanation_writer, read_explanations,
                                        read_latent_stats, read_tags, tag_writer, write_latent_stats)


def test_explanations_round_trip_and_keep_unknown_keys(tmp_path):
    path = tmp_path / "interpret" / "explanations.jsonl"
    first = {"hook": "layers.0.mlp_out", "layer": 0, "latent": 3, "status": "failed", "reason": "timeout",
             "attempt": 1, "copied": []}
    with explanation_writer(path) as w:
        w.write(first)
        w.write(ExplanationRecord(hook="layers.0.mlp_out", layer=0, latent=3, status="ok", explanation="dogs",
                                  extra={"attempt": 2}))
        w.write(ExplanationRecord(hook="layers.1.mlp_out", layer=1, latent=0, explanation=None))
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"hook": "layers.1.mlp_out", "lat')  # a killed writer's torn line
    recs = read_explanations(path)
    assert sorted(recs) == [("layers.0.mlp_out", 3), ("layers.1.mlp_out", 0)]
    r = recs[("layers.0.mlp_out", 3)]
    assert r.ok and r.explanation == "dogs" and r.get("attempt") == 2 and r["status"] == "ok"
    assert not recs[("layers.1.mlp_out", 0)].ok
    again = ExplanationRecord.from_json(json.loads(json.dumps(first)))
    assert again.to_json() == {**ExplanationRecord(hook="", layer=None, latent=0).to_json(), **first}


def test_tags_round_trip(tmp_path):
    path = tmp_path / "tags.jsonl"
    with tag_writer(path) as w:
        w.write(TagRecord(hook="layers.3.mlp_out", layer=3, latent=7, tags=["violence"], basis="llm and pairs",
                          evidence={"llm": {"status": "ok"}}, extra={"new_field": 1}))
    r = read_tags(path)[("layers.3.mlp_out", 7)]
    assert r.tags == ["violence"] and r["evidence"]["llm"]["status"] == "ok" and r.get("new_field") == 1


def test_latent_stats_reader_and_writer(tmp_path):
    tensors = {"latent_ids": torch.tensor([4, 9]), "density": torch.tensor([0.1, 0.2]),
               "top_acts": torch.ones(2, 3), "bottom_acts": torch.zeros(2, 3),
               "quantile_999": torch.tensor([0.5, 0.7]), "max_act": torch.tensor([1.0, 2.0])}
    write_latent_stats(tmp_path / "h", tensors, {"hook": "layers.0.mlp_out", "quantile": 0.99})
    st = read_latent_stats(tmp_path / "h")
    assert st.hook == "layers.0.mlp_out" and st.q == 0.99 and st.latent_ids.tolist() == [4, 9]
    assert torch.equal(st.quantile, tensors["quantile_999"])
    with pytest.raises(UserError, match="run `safesail collect` first"):
        read_latent_stats(tmp_path / "missing")
