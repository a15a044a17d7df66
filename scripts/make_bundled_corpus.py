"""Build the bundled data under data/ from the hand-written sources in data/src/.

    python scripts/make_bundled_corpus.py            # rebuild every JSONL file from data/src/
    python scripts/make_bundled_corpus.py --generate # also (re)generate model answers (slow, CPU)
    python scripts/make_bundled_corpus.py --count    # print token counts (SmolLM2 tokenizer)

Everything in data/src/ was written by this project. The optional generation step
asks the embedded default model (SmolLM2-135M-Instruct, greedy decoding, so the
output is deterministic on a given machine) to answer the prompts listed in
data/src/generate_prompts.txt and stores the answers in data/src/generated_answers.jsonl
(committed, so a rebuild without --generate reproduces the corpus exactly). Generation
is resumable: answers already in that file are kept.

Source formats (all UTF-8):
  pairs_<domain>.txt   `@lang xx` headers, then `concept | concept query | neutral query`
  queries.txt          `@lang xx` / `@domain d` headers, then one user query per line
  text_<lang>.txt      records separated by `=== source=<s> domain=<d>` lines
  chats.txt            records `=== lang=<l> domain=<d>`, then `U: ...` / `A: ...` turns
                       (a line without a prefix continues the previous turn)
  compare.txt          records `=== <id> <domain>`, then `en: ...`, `zh: ...`, `hi: ...`
  open_prompts.txt     `@split eval|scan` / `@lang xx` headers, then one open-ended prompt per line (verify)
  generate_prompts.txt `domain | query` (English prompts the default model answers)
  generated_rejected.txt  prompts whose generated answer a reviewer left out (one a line)
Lines starting with `#` are comments everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SRC = DATA / "src"
DOMAINS = ("benign", "politics", "pornography", "violence", "terror")
SAFETY_DOMAINS = DOMAINS[1:]
LANGS = ("en", "zh", "hi")
GEN_SOURCE = "generated:smollm2-135m-instruct"
GEN_FILE = SRC / "generated_answers.jsonl"
# Generated answers containing any of these are dropped (a coarse safety screen on top of
# choosing only benign or educational prompts).
BLOCKLIST = re.compile(r"\b(nude|naked|sex|porn|explicit|genital|detonat|explosive recipe|how to kill|"
                       r"step-by-step.*(bomb|weapon)|gunpowder|suicide)\w*", re.IGNORECASE)


def _lines(path: Path):
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            continue
        yield line


def _check(value: str, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ValueError(f"{where}: {value!r} is not one of {allowed}")
    return value


def read_pairs() -> list[dict]:
    records = []
    for domain in SAFETY_DOMAINS:
        path = SRC / f"pairs_{domain}.txt"
        lang, counter = None, {}
        for line in _lines(path):
            if line.startswith("@lang"):
                lang = _check(line.split()[1], LANGS, str(path))
                continue
            if not line.strip():
                continue
            parts = [p.strip() for p in line.split("|")]
            if len(parts) != 3 or not all(parts) or lang is None:
                raise ValueError(f"{path}: bad pair line {line!r}")
            counter[lang] = counter.get(lang, 0) + 1
            records.append({"id": f"{domain}-{lang}-{counter[lang]:03d}", "domain": domain, "concept": parts[0],
                            "lang": lang, "concept_query": parts[1], "neutral_query": parts[2]})
    return records


def read_queries() -> list[dict]:
    lang, domain, out = None, None, []
    path = SRC / "queries.txt"
    for line in _lines(path):
        if line.startswith("@lang"):
            lang = _check(line.split()[1], LANGS, str(path))
        elif line.startswith("@domain"):
            domain = _check(line.split()[1], DOMAINS, str(path))
        elif line.strip():
            out.append({"query": line.strip(), "lang": lang, "domain": domain, "source": "written"})
    return out


def _header(line: str) -> dict:
    return dict(kv.split("=", 1) for kv in line[3:].split())


def read_texts(lang: str) -> list[dict]:
    path = SRC / f"text_{lang}.txt"
    out, head, buf = [], None, []

    def flush():
        text = "\n".join(buf).strip()
        if head is not None and text:
            out.append({"text": text, "lang": lang, "source": "written:" + head["source"],
                        "domain": _check(head.get("domain", "benign"), DOMAINS, str(path))})

    for line in _lines(path):
        if line.startswith("==="):
            flush()
            head, buf = _header(line), []
        else:
            buf.append(line)
    flush()
    return out


def read_chats() -> list[dict]:
    path = SRC / "chats.txt"
    out, head, turns = [], None, []

    def flush():
        if head is not None and turns:
            msgs = [{"role": r, "content": "\n".join(c).strip()} for r, c in turns]
            out.append({"messages": msgs, "lang": _check(head["lang"], LANGS, str(path)),
                        "domain": _check(head["domain"], DOMAINS, str(path)), "source": "written"})

    for line in _lines(path):
        if line.startswith("==="):
            flush()
            head, turns = _header(line), []
        elif line.startswith("U: "):
            turns.append(("user", [line[3:]]))
        elif line.startswith("A: "):
            turns.append(("assistant", [line[3:]]))
        elif turns:
            turns[-1][1].append(line)
    flush()
    return out


def read_compare() -> list[dict]:
    path = SRC / "compare.txt"
    out = []
    for line in _lines(path):
        if line.startswith("==="):
            qid, domain = line[3:].split()
            out.append({"id": qid, "domain": _check(domain, DOMAINS, str(path))})
        elif line[:3] in ("en:", "zh:", "hi:"):
            out[-1][line[:2]] = line[3:].strip()
    for rec in out:
        missing = [k for k in LANGS if not rec.get(k)]
        if missing:
            raise ValueError(f"{path}: {rec['id']} lacks {missing}")
    return out


def read_open_prompts() -> list[dict]:
    """data/src/open_prompts.txt: `@split` / `@lang` headers, one prompt per line (verify's open prompts)."""
    path = SRC / "open_prompts.txt"
    out, split, lang, n = [], None, None, 0
    for line in _lines(path):
        if line.startswith("@split "):
            split, lang = _check(line.split()[1], ("eval", "scan"), str(path)), None
        elif line.startswith("@lang "):
            lang, n = _check(line.split()[1], LANGS, str(path)), 0
        elif line.strip():
            if split is None or lang is None:
                raise ValueError(f"{path}: a prompt before its @split / @lang header: {line!r}")
            n += 1
            out.append({"id": f"open-{split}-{lang}-{n:02d}", "lang": lang, "split": split, "prompt": line.strip()})
    return out


def read_generate_prompts() -> list[tuple[str, str]]:
    out = []
    for line in _lines(SRC / "generate_prompts.txt"):
        if line.strip():
            domain, query = (p.strip() for p in line.split("|", 1))
            out.append((_check(domain, DOMAINS, "generate_prompts.txt"), query))
    return out


def generated_chats() -> list[dict]:
    if not GEN_FILE.exists():
        return []
    rejected = {line.strip() for line in _lines(SRC / "generated_rejected.txt") if line.strip()}
    out = []
    for line in GEN_FILE.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["query"] in rejected or BLOCKLIST.search(rec["answer"]) or len(rec["answer"].split()) < 20:
            continue
        out.append({"messages": [{"role": "user", "content": rec["query"]},
                                 {"role": "assistant", "content": rec["answer"]}],
                    "lang": "en", "domain": rec["domain"], "source": GEN_SOURCE})
    return out


def _clean_answer(text: str) -> str:
    text = text.strip()
    # Cut a dangling unfinished sentence at the end (generation stops at max_new_tokens).
    if text and text[-1] not in ".!?)`\"'":
        cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("!"), text.rfind("?"))
        if cut > len(text) // 2:
            text = text[: cut + 1]
    return text


def generate(batch_size: int = 8, max_new_tokens: int = 180, threads: int = 1) -> None:
    """Answer every prompt in generate_prompts.txt with the default model (greedy), resumably."""
    import torch
    from tqdm import tqdm

    sys.path.insert(0, str(REPO))
    from safesail.config import compose
    from safesail.models import load_model

    torch.set_num_threads(threads)
    done = set()
    if GEN_FILE.exists():
        done = {json.loads(line)["query"] for line in GEN_FILE.read_text(encoding="utf-8").splitlines()}
    # Round-robin over domains, so that a partial run still covers every domain.
    prompts, rank = read_generate_prompts(), {}
    order = []
    for d, q in prompts:
        rank[d] = rank.get(d, -1) + 1
        order.append((rank[d], DOMAINS.index(d), d, q))
    todo = [(d, q) for _, _, d, q in sorted(order) if q not in done]
    if not todo:
        log.info("all %d prompts already answered", len(done))
        return
    cfg = compose([])
    lm = load_model(cfg.model, "cpu")
    tok, model = lm.tokenizer, lm.model
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with open(GEN_FILE, "a", encoding="utf-8") as f:
        for i in tqdm(range(0, len(todo), batch_size), desc="generating answers"):
            batch = todo[i: i + batch_size]
            texts = [tok.apply_chat_template([{"role": "system", "content": cfg.model.system_prompt},
                                              {"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for _, q in batch]
            enc = tok(texts, return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     repetition_penalty=1.2, pad_token_id=pad)
            for (domain, q), ids in zip(batch, out[:, enc.input_ids.shape[1]:]):
                answer = _clean_answer(tok.decode(ids, skip_special_tokens=True))
                f.write(json.dumps({"domain": domain, "query": q, "answer": answer}, ensure_ascii=False) + "\n")
            f.flush()


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    log.info("wrote %d records to %s", len(records), path)


def build(out: Path = DATA) -> list[Path]:
    """Write every bundled JSONL file under `out` (data/ by default); return their paths."""
    pairs = read_pairs()
    files = {
        "pairs/contrastive_pairs.jsonl": pairs,
        "queries/compare.jsonl": read_compare(),
        "queries/open_prompts.jsonl": read_open_prompts(),   # verify's open prompts; not in the corpus
    }
    # The corpus holds the written queries and, as further queries, both sides of every pair.
    queries = read_queries()
    seen = {q["query"] for q in queries}
    for p in pairs:
        for key, dom in (("concept_query", p["domain"]), ("neutral_query", "benign")):
            if p[key] not in seen:
                seen.add(p[key])
                queries.append({"query": p[key], "lang": p["lang"], "domain": dom, "source": "pairs"})
    files["corpus/queries.jsonl"] = queries
    for lang in LANGS:
        files[f"corpus/text_{lang}.jsonl"] = read_texts(lang)
    files["corpus/chats.jsonl"] = read_chats() + generated_chats()
    for rel, records in files.items():
        write_jsonl(out / rel, records)
    return [out / rel for rel in files]


def record_text(rec: dict) -> str:
    if "text" in rec:
        return rec["text"]
    if "query" in rec:
        return rec["query"]
    return "\n".join(m["content"] for m in rec["messages"])


def count() -> None:
    """Print tokens per file and per language with the SmolLM2 tokenizer.

    "content tokens": the text of each record alone. "as loaded": the documents exactly as
    the corpus loader (safesail.corpus.iter_documents, bundled data config) makes them,
    i.e. queries and chats inside the chat template with the default system prompt.
    """
    import os

    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from safesail.config import compose
    from safesail.corpus import iter_documents
    from safesail.models.loading import model_folder

    cfg = compose([])
    cache = os.environ.get("SAFESAIL_CACHE", Path.home() / ".cache" / "safesail")
    tok = AutoTokenizer.from_pretrained(model_folder(cfg.model, cache))
    by_lang, by_file = {}, {}
    for path in sorted((DATA / "corpus").glob("*.jsonl")):
        recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        lens = [len(x) for x in tok([record_text(r) for r in recs], add_special_tokens=False).input_ids]
        for rec, n in zip(recs, lens):
            by_lang[rec["lang"]] = by_lang.get(rec["lang"], 0) + n
        by_file[path.name] = [len(recs), sum(lens), 0]
    data_cfg = cfg.data.copy()
    data_cfg.paths = [str(DATA / "corpus")]
    for doc in iter_documents(data_cfg, tok, cfg.model.system_prompt):
        by_file[doc.meta["source"]][2] += len(tok(doc.text, add_special_tokens=False).input_ids)
    print("| file | records | content tokens | tokens as loaded |")
    print("|---|---:|---:|---:|")
    for name, (r, n, t) in by_file.items():
        print(f"| `{name}` | {r} | {n:,} | {t:,} |")
    total = sum(by_lang.values())
    cols = list(zip(*by_file.values()))
    print(f"| **total** | {sum(cols[0])} | {total:,} | {sum(cols[2]):,} |")
    print()
    for lang, n in sorted(by_lang.items()):
        print(f"- {lang}: {n:,} content tokens ({100 * n / total:.1f}%)")
    q_langs = {}
    for line in (DATA / "corpus" / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        lang = json.loads(line)["lang"]
        q_langs[lang] = q_langs.get(lang, 0) + 1
    n_q = sum(q_langs.values())
    print("- queries by language: " + ", ".join(f"{k} {v} ({100 * v / n_q:.0f}%)" for k, v in sorted(q_langs.items())))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generate", action="store_true", help="answer data/src/generate_prompts.txt with the default model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--count", action="store_true", help="only print token counts")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.count:
        count()
        return
    if args.generate:
        generate(batch_size=args.batch_size, threads=args.threads)
    build()
    count()


if __name__ == "__main__":
    main()
