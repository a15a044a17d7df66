"""The bundled data under data/: every file parses, fields and labels are valid, the
pairs meet the select stage's minimums, and the corpus is big enough for the default model."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
DOMAINS = {"benign", "politics", "pornography", "violence", "terror"}
SAFETY_DOMAINS = DOMAINS - {"benign"}
LANGS = {"en", "zh", "hi"}
MIN_PAIRS = {"en": 50, "zh": 20, "hi": 20}


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:  # strict UTF-8: a bad byte raises here
        for n, line in enumerate(f, 1):
            assert line.strip(), f"{path.name}:{n} is an empty line"
            rec = json.loads(line)
            assert isinstance(rec, dict), f"{path.name}:{n} is not a JSON object"
            records.append(rec)
    assert records, f"{path} is empty"
    return records


def corpus_records() -> list[dict]:
    files = sorted((DATA / "corpus").glob("*.jsonl"))
    assert files, "data/corpus holds no JSONL files"
    return [rec for path in files for rec in read_jsonl(path)]


def load_build_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_bundled_corpus", REPO / "scripts" / "make_bundled_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


record_text = load_build_script().record_text


def test_corpus_records_have_one_valid_shape_and_labels():
    kinds = Counter()
    for rec in corpus_records():
        shape = [k for k in ("text", "query", "messages") if k in rec]
        assert len(shape) == 1, f"record must have exactly one of text/query/messages: {rec}"
        kinds[shape[0]] += 1
        assert rec["lang"] in LANGS, rec
        assert rec["domain"] in DOMAINS, rec
        if "messages" in rec:
            roles = [m["role"] for m in rec["messages"]]
            assert roles[0] == "user" and set(roles) <= {"user", "assistant"}, rec
            assert all(m["content"].strip() for m in rec["messages"]), rec
        else:
            assert record_text(rec).strip(), rec
    assert kinds["text"] and kinds["query"] and kinds["messages"], kinds


def test_corpus_covers_every_domain_in_every_language_with_english_majority():
    queries = [r for r in corpus_records() if "query" in r]
    seen = {(r["lang"], r["domain"]) for r in queries}
    missing = {(lang, d) for lang in LANGS for d in DOMAINS} - seen
    assert not missing, f"no queries for {sorted(missing)}"
    by_lang = Counter(r["lang"] for r in queries)
    assert by_lang["en"] > len(queries) / 2, by_lang
    assert by_lang["zh"] >= 0.15 * len(queries) and by_lang["hi"] >= 0.15 * len(queries), by_lang
    texts = {(r["lang"], r["domain"]) for r in corpus_records() if "text" in r}
    assert {(lang, "benign") for lang in LANGS} <= texts


def test_contrastive_pairs_meet_minimums_and_are_minimal_twins():
    pairs = read_jsonl(DATA / "pairs" / "contrastive_pairs.jsonl")
    required = {"id", "domain", "concept", "lang", "concept_query", "neutral_query"}
    ids = [p["id"] for p in pairs]
    assert len(ids) == len(set(ids)), "duplicate pair ids"
    counts = Counter()
    for p in pairs:
        assert required <= set(p), p
        assert p["domain"] in SAFETY_DOMAINS and p["lang"] in LANGS, p
        assert all(isinstance(p[k], str) and p[k].strip() for k in required), p
        assert p["concept_query"] != p["neutral_query"], p
        assert p["id"].startswith(f"{p['domain']}-{p['lang']}-"), p
        counts[p["domain"], p["lang"]] += 1
    for domain in SAFETY_DOMAINS:
        for lang, minimum in MIN_PAIRS.items():
            assert counts[domain, lang] >= minimum, (domain, lang, counts[domain, lang])
    concept_queries = [p["concept_query"] for p in pairs]
    assert len(set(concept_queries)) == len(concept_queries), "a concept query appears twice"


def test_pairs_are_varied_not_one_template():
    pairs = read_jsonl(DATA / "pairs" / "contrastive_pairs.jsonl")
    for domain in SAFETY_DOMAINS:
        en = [p for p in pairs if p["domain"] == domain and p["lang"] == "en"]
        openings = Counter(" ".join(p["concept_query"].split()[:2]) for p in en)
        assert openings.most_common(1)[0][1] <= len(en) // 4, (domain, openings.most_common(3))
        assert len({p["concept"] for p in en}) >= 0.9 * len(en), domain


def test_compare_queries_have_all_three_languages():
    recs = read_jsonl(DATA / "queries" / "compare.jsonl")
    assert len(recs) >= 12
    assert len({r["id"] for r in recs}) == len(recs)
    assert {r["domain"] for r in recs} == DOMAINS
    for r in recs:
        assert all(isinstance(r.get(lang), str) and r[lang].strip() for lang in LANGS), r
        assert any("\u4e00" <= ch <= "\u9fff" for ch in r["zh"]), r["zh"]
        assert any("\u0900" <= ch <= "\u097f" for ch in r["hi"]), r["hi"]


def test_committed_files_are_exactly_what_the_build_script_makes(tmp_path):
    """data/*.jsonl are reproducible from data/src/ (no hand edits, no stale output)."""
    built = load_build_script().build(tmp_path)
    assert len(built) == 8
    for path in built:
        rel = path.relative_to(tmp_path)
        assert path.read_bytes() == (DATA / rel).read_bytes(), f"data/{rel} differs from a fresh build"
    committed = {p.relative_to(DATA) for p in DATA.glob("*/*.jsonl") if p.parent.name != "src"}
    assert committed == {p.relative_to(tmp_path) for p in built}, "a JSONL file in data/ is not made by the script"


@pytest.mark.slow
def test_corpus_has_at_least_50k_smollm2_tokens():
    folder = Path(os.environ.get("SAFESAIL_CACHE", Path.home() / ".cache" / "safesail")) / "models" / "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").exists():
        pytest.skip("the SmolLM2 tokenizer is not converted yet in the cache dir (run any slow test "
                    "that loads the default model first); other tokenizers count differently")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok([record_text(r) for r in corpus_records()], add_special_tokens=False).input_ids
    total = sum(len(x) for x in ids)
    assert total >= 50_000, total
