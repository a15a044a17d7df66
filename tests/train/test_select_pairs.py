"""The pairs file: format, validation, one-sentence errors that name the line."""

from __future__ import annotations

import json

import pytest

from safesail.errors import UserError
from safesail.train.pairs import DOMAINS, load_pairs, pair_domains

GOOD = {"id": "p1", "domain": "violence", "concept": "weapon", "lang": "en",
        "concept_query": "Why do people carry a weapon?", "neutral_query": "Why do people carry an umbrella?"}


def _write(tmp_path, records, name="pairs.jsonl"):
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loads_valid_pairs_skipping_comments_and_blank_lines(tmp_path):
    second = {**GOOD, "id": "p2", "domain": "politics", "lang": "zh", "concept": "抗议",
              "concept_query": "为什么学生参加抗议？", "neutral_query": "为什么学生参加音乐会？"}
    path = _write(tmp_path, ["# a comment", GOOD, "", second])
    pairs = load_pairs(path)
    assert [p.id for p in pairs] == ["p1", "p2"]
    assert pairs[1].concept_query == "为什么学生参加抗议？"
    assert pair_domains(pairs) == ["politics", "violence"]
    assert [p.id for p in load_pairs(path, ["politics"])] == ["p2"]


@pytest.mark.parametrize("bad, phrase", [
    ({k: v for k, v in GOOD.items() if k != "neutral_query"}, "lacks the field(s) neutral_query"),
    ({**GOOD, "domain": "gambling"}, "unknown domain 'gambling'"),
    ({**GOOD, "concept_query": "   "}, "empty concept_query"),
    ({**GOOD, "neutral_query": GOOD["concept_query"]}, "identical concept and neutral"),
    ("{not json", "is not valid JSON"),
    ({**GOOD, "lang": ["en"]}, "non-text value in lang"),
])
def test_bad_lines_give_one_sentence_naming_the_line(tmp_path, bad, phrase):
    path = _write(tmp_path, [GOOD, bad] if not isinstance(bad, dict) else [GOOD, {**bad, "id": "p9"}])
    with pytest.raises(UserError) as e:
        load_pairs(path)
    msg = str(e.value)
    assert phrase in msg and f"{path} line 2" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")


def test_duplicate_ids_missing_file_and_empty_selection(tmp_path):
    with pytest.raises(UserError, match="repeats the id 'p1' of line 1"):
        load_pairs(_write(tmp_path, [GOOD, GOOD]))
    with pytest.raises(UserError, match="does not exist"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="holds no pairs for the domains terror"):
        load_pairs(_write(tmp_path, [GOOD]), ["terror"])
    with pytest.raises(UserError, match="unknown domain 'gore'"):
        load_pairs(_write(tmp_path, [GOOD]), ["gore"])


def test_bundled_pairs_file_if_present_is_valid():
    from safesail.train.pairs import resolve_pairs_path

    path = resolve_pairs_path(None)
    if not path.exists():
        pytest.skip("data/pairs/contrastive_pairs.jsonl has not landed yet")
    pairs = load_pairs(path)
    for d in DOMAINS:
        by_lang = {lang: sum(1 for p in pairs if p.domain == d and p.lang == lang) for lang in ("en", "zh", "hi")}
        assert by_lang["en"] >= 50 and by_lang["zh"] >= 20 and by_lang["hi"] >= 20, (d, by_lang)
