import json

import pytest
from omegaconf import OmegaConf

from cache_helpers import assert_one_sentence, write_corpus
from safesail.chat import encode_chat
from safesail.config import CONFIG_DIR
from safesail.corpus import Document, iter_documents, pack_windows, separator_id, tokenize_document
from safesail.errors import UserError

SYS = "You are a helpful assistant."


def data_cfg(*paths, **kw):
    base = OmegaConf.load(CONFIG_DIR / "data" / "bundled.yaml")
    base.paths = [str(p) for p in paths]
    for k, v in kw.items():
        base[k] = v
    return base


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


RECORDS = [
    {"text": "A plain paragraph about rivers.", "lang": "en", "domain": "benign"},
    {"query": "如何烤面包？", "lang": "zh", "domain": "benign"},
    {"query": "Who won the election?", "answer": "I cannot know that.", "lang": "en", "domain": "politics"},
    {"messages": [{"role": "user", "content": "नमस्ते"}, {"role": "assistant", "content": "Hello!"}],
     "lang": "hi", "domain": "benign"},
]


def test_record_kinds_meta_and_chat_template(tmp_path, tiny_model):
    tok = tiny_model.tokenizer
    docs = list(iter_documents(data_cfg(write_jsonl(tmp_path / "a.jsonl", RECORDS)), tok, SYS))
    assert [d.kind for d in docs] == ["text", "chat", "chat", "chat"]
    assert [d.doc_id for d in docs] == [0, 1, 2, 3]
    assert docs[0].text == RECORDS[0]["text"]
    assert docs[1].meta == {"lang": "zh", "domain": "benign", "source": "a.jsonl"}
    # A bare query is rendered as the diagnose stage renders it: system prompt + user turn + generation prompt.
    assert tokenize_document(docs[1], tok) == encode_chat(tok, "如何烤面包？", SYS)
    assert tokenize_document(docs[2], tok) == encode_chat(tok, RECORDS[2]["query"], SYS, RECORDS[2]["answer"])
    assert docs[3].text.startswith("<|im_start|>system\n" + SYS) and docs[3].text.endswith("Hello!<|im_end|>\n")
    # plain text ends with the document separator
    assert tokenize_document(docs[0], tok)[-1] == separator_id(tok)


def test_jsonl_parquet_saved_folder_and_txt_agree(tmp_path, tiny_model):
    import datasets

    tok = tiny_model.tokenizer
    recs = [{"text": f"document number {i}", "lang": "en"} for i in range(5)]
    jl = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = datasets.Dataset.from_list(recs)
    ds.to_parquet(str(tmp_path / "b.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "c.txt").write_text("\n\n".join(r["text"] for r in recs) + "\n", encoding="utf-8")
    texts = {}
    for name, path in [("jsonl", jl), ("parquet", tmp_path / "b.parquet"), ("saved", tmp_path / "saved"),
                       ("txt", tmp_path / "c.txt")]:
        texts[name] = [d.text.strip() for d in iter_documents(data_cfg(path), tok)]
    assert texts["jsonl"] == texts["parquet"] == texts["saved"] == texts["txt"] == [r["text"] for r in recs]


def test_folder_order_is_sorted_and_deterministic(tmp_path, tiny_model):
    tok = tiny_model.tokenizer
    write_jsonl(tmp_path / "b.jsonl", [{"text": "second file"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first file"}, {"text": "first file, again"}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "third"}])
    (tmp_path / ".hidden.jsonl").write_text("not json at all", encoding="utf-8")
    got = [d.text for d in iter_documents(data_cfg(tmp_path), tok)]
    assert got == ["first file", "first file, again", "second file", "third"]
    assert got == [d.text for d in iter_documents(data_cfg(tmp_path), tok)]


def test_pack_windows_fixed_length_cap_and_provenance(tmp_path, tiny_model):
    tok = tiny_model.tokenizer
    cfg = data_cfg(write_corpus(tmp_path / "c", n=60))
    docs = list(iter_documents(cfg, tok, SYS))
    stream = [t for d in docs for t in tokenize_document(d, tok)]
    wins = list(pack_windows(docs, tok, 32))
    assert len(wins) == len(stream) // 32
    assert all(len(w.input_ids) == len(w.doc_ids) == len(w.positions) == 32 for w in wins)
    assert [w.index for w in wins] == list(range(len(wins)))
    assert [t for w in wins for t in w.input_ids] == stream[:len(wins) * 32]
    # doc ids and positions point back at the document token
    toks = {d.doc_id: tokenize_document(d, tok) for d in docs}
    for w in wins[:10]:
        for t, doc, pos in zip(w.input_ids, w.doc_ids, w.positions):
            assert toks[doc][pos] == t
    capped = list(pack_windows(iter(docs), tok, 32, max_tokens=100))
    assert len(capped) == 3 and [w.input_ids for w in capped] == [w.input_ids for w in wins[:3]]
    with pytest.raises(UserError):
        list(pack_windows(docs, tok, 32, max_tokens=10))


def test_non_utf8_file_is_refused(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not valid UTF-8") as e:
        list(iter_documents(data_cfg(bad), tiny_model.tokenizer))
    assert "offset 13" in str(e.value)
    assert_one_sentence(str(e.value))


@pytest.mark.parametrize("case", ["empty_file", "blank_records", "missing", "bad_json", "no_fields", "bad_parquet",
                                  "empty_folder"])
def test_bad_corpus_gives_one_sentence(tmp_path, tiny_model, case):
    p = tmp_path / "x.jsonl"
    if case == "empty_file":
        p.write_text("", encoding="utf-8")
    elif case == "blank_records":
        write_jsonl(p, [{"text": "  "}, {"query": ""}])
    elif case == "missing":
        p = tmp_path / "nope"
    elif case == "bad_json":
        p.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    elif case == "no_fields":
        write_jsonl(p, [{"body": "a"}, {"body": "b"}])
    elif case == "bad_parquet":
        p = tmp_path / "x.parquet"
        p.write_bytes(b"PAR1 this is not parquet")
    elif case == "empty_folder":
        p = tmp_path / "folder"
        p.mkdir()
    with pytest.raises(UserError) as e:
        list(iter_documents(data_cfg(p), tiny_model.tokenizer))
    assert_one_sentence(str(e.value))


def test_hub_dataset_offline_is_one_sentence(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = data_cfg(hub="someone/some-dataset-that-is-not-cached")
    with pytest.raises(UserError, match="offline") as e:
        list(iter_documents(cfg, tiny_model.tokenizer))
    assert_one_sentence(str(e.value))


def test_text_document_keeps_tokenizer_specials():
    class Tok:  # stands in for a tokenizer that adds a BOS token (unit test of the rule, not of a model)
        unk_token_id = None
        eos_token_id = 9

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if add_special_tokens else []) + [len(w) for w in text.split()]}

        def convert_tokens_to_ids(self, token):
            return None

    assert tokenize_document(Document(0, "ab cde", "text"), Tok()) == [1, 2, 3, 9]
    assert tokenize_document(Document(0, "ab cde", "chat"), Tok()) == [2, 3]
