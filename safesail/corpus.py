"""Corpora: load documents through `datasets`, tokenise them, pack them into fixed-length windows.

A corpus (the `data` config group) is a list of local files or folders
(`.jsonl`, `.json`, `.parquet`, `.txt`, or a `save_to_disk` folder), or a hub
dataset name when the user configured one. Each record is one of

- plain text: `{"text": "..."}`                       -> a `text` document
- a bare user query: `{"query": "...", "answer"?: "..."}` -> a `chat` document
- a conversation: `{"messages": [{"role", "content"}, ...]}` -> a `chat` document

Chat documents are rendered with the model's chat template and the configured
system prompt, exactly as the diagnose stage will show them to the model. Other
scalar fields of a record (`lang`, `domain`, ...) travel in `Document.meta`.

The order of documents and windows is deterministic: files in sorted order,
records in file order.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from safesail.chat import format_chat
from safesail.errors import UserError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_TEXT_EXTS = {".jsonl", ".json", ".txt"}


@dataclass
class Document:
    doc_id: int
    text: str                     # the text the model sees (chat template already applied for chat docs)
    kind: str                     # "text" | "chat"
    meta: dict = field(default_factory=dict)


@dataclass
class Window:
    index: int                    # 0, 1, 2, ... in corpus order
    input_ids: list[int]          # exactly ctx_len token ids
    doc_ids: list[int]            # the document each token comes from
    positions: list[int]          # the token's position inside its document (0 = first token)


# ---- locating and reading the sources --------------------------------------------------

def resolve_path(path: str | Path) -> Path:
    """A configured path: absolute, relative to the working directory, or to the source tree (bundled data)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    bundled = REPO_ROOT / p
    return bundled if bundled.exists() else p


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").exists() or (folder / "state.json").exists() or \
        (folder / "dataset_dict.json").exists()


def list_sources(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders into a sorted list of data files and `save_to_disk` folders."""
    out: list[Path] = []
    for raw in paths:
        p = resolve_path(raw)
        if not p.exists():
            raise UserError(f"corpus path {str(raw)!r} does not exist; fix data.paths (files or folders of "
                            ".jsonl/.json/.parquet/.txt, or a save_to_disk folder).")
        if p.is_file():
            if p.suffix.lower() not in _BUILDERS:
                raise UserError(f"corpus file {p} has an unsupported type; use .jsonl, .json, .parquet or .txt.")
            out.append(p)
        elif _is_saved_dataset(p):
            out.append(p)
        else:
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _BUILDERS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            saved = sorted(d for d in p.iterdir() if d.is_dir() and _is_saved_dataset(d))
            if not found and not saved:
                raise UserError(f"corpus folder {p} holds no .jsonl/.json/.parquet/.txt files; add data or fix "
                                "data.paths.")
            out.extend(sorted(found + saved))
    return out


def check_utf8(path: Path) -> bool:
    """Raise a UserError naming the byte offset if a text file is not valid UTF-8; False if it is blank."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    blank = True
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                blank = blank and not chunk.strip()
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as e:
                    raise UserError(f"corpus file {path} is not valid UTF-8 (bad byte at offset "
                                    f"{offset + e.start}); re-encode it as UTF-8.") from None
                offset += len(chunk)
            dec.decode(b"", final=True)
        return not blank
    except UnicodeDecodeError:
        raise UserError(f"corpus file {path} is not valid UTF-8 (it ends inside a character); "
                        "re-encode it as UTF-8.") from None
    except OSError as e:
        raise UserError(f"cannot read corpus file {path} ({e.strerror}); check its permissions.") from None


def _load_source(path: Path, data_cfg) -> Any:
    """One file or saved folder as a `datasets.Dataset`."""
    import datasets

    datasets.disable_progress_bars()

    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - datasets raises many types
            raise UserError(f"cannot load the saved dataset {path} ({type(e).__name__}); check that it was "
                            "written with save_to_disk.") from None
        if isinstance(ds, datasets.DatasetDict):
            split = data_cfg.get("split") or "train"
            if split not in ds:
                raise UserError(f"the saved dataset {path} has no split {split!r} (it has {', '.join(ds)}); "
                                "set data.split.")
            ds = ds[split]
        return ds
    ext = path.suffix.lower()
    if ext in _TEXT_EXTS:
        if not check_utf8(path):
            return None
    kwargs: dict[str, Any] = {}
    if ext == ".txt":
        kwargs["sample_by"] = data_cfg.get("text_sample_by") or "paragraph"
    try:
        return datasets.load_dataset(_BUILDERS[ext], data_files=[str(path)], split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - pyarrow/json errors come in many types
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"cannot read corpus file {path} ({msg}); check that it is valid "
                        f"{_BUILDERS[ext].upper()}.") from None


def _load_hub(data_cfg) -> Any:
    import os

    import datasets

    name = str(data_cfg.hub)
    try:
        return datasets.load_dataset(name, data_cfg.get("hub_config"), split=data_cfg.get("split") or "train",
                                     streaming=True)
    except Exception as e:  # noqa: BLE001
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        why = "you are offline (HF_HUB_OFFLINE=1)" if offline else (str(e).splitlines()[0][:160] or type(e).__name__)
        raise UserError(f"cannot load the hub dataset {name!r} ({why}); go online, or point data.paths at "
                        "local files and set data.hub=null.") from None


# ---- records -> documents --------------------------------------------------------------------

def _record_to_doc(rec: dict, data_cfg, tokenizer, system_prompt: str | None) -> tuple[str, str] | None:
    """(kind, text) for one record, or None if it holds nothing usable."""
    mf, qf, tf = (data_cfg.get("messages_field") or "messages", data_cfg.get("query_field") or "query",
                  data_cfg.get("text_field") or "text")
    msgs = rec.get(mf)
    if msgs:
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
        if system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system_prompt}] + msgs
        add_gen = msgs[-1]["role"] != "assistant"
        return "chat", tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_gen)
    query = rec.get(qf)
    if isinstance(query, str) and query.strip():
        answer = rec.get(data_cfg.get("answer_field") or "answer")
        answer = answer if isinstance(answer, str) and answer.strip() else None
        return "chat", format_chat(tokenizer, query, system_prompt, answer)
    text = rec.get(tf)
    if isinstance(text, str) and text.strip():
        return "text", text
    return None


def _meta(rec: dict, data_cfg, source: str) -> dict:
    skip = {data_cfg.get("messages_field") or "messages", data_cfg.get("query_field") or "query",
            data_cfg.get("text_field") or "text", data_cfg.get("answer_field") or "answer"}
    meta = {k: v for k, v in rec.items() if k not in skip and isinstance(v, (str, int, float, bool))}
    meta["source"] = source
    return meta


def iter_documents(data_cfg, tokenizer, system_prompt: str | None = None) -> Iterator[Document]:
    """Every document of the corpus in a deterministic order (files sorted, records in file order)."""
    if data_cfg.get("hub"):
        sources: list[tuple[str, Any]] = [(str(data_cfg.hub), None)]
    else:
        paths = data_cfg.get("paths") or []
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not paths:
            raise UserError("the corpus is not configured; set data.paths to files or folders, or data.hub to a "
                            "hub dataset name.")
        sources = [(str(p), p) for p in list_sources(paths)]
    doc_id = 0
    for label, path in sources:
        ds = _load_hub(data_cfg) if path is None else _load_source(path, data_cfg)
        if ds is None:
            continue
        name = label if path is None else path.name
        usable = 0
        for rec in ds:
            got = _record_to_doc(rec, data_cfg, tokenizer, system_prompt)
            if got is None:
                continue
            usable += 1
            yield Document(doc_id=doc_id, text=got[1], kind=got[0], meta=_meta(rec, data_cfg, name))
            doc_id += 1
        if usable == 0 and path is not None and len(ds) > 0:
            cols = ", ".join(ds.column_names)
            raise UserError(f"corpus source {path} has no usable records (columns: {cols}); give each record a "
                            f"{data_cfg.get('text_field') or 'text'!r}, {data_cfg.get('query_field') or 'query'!r} "
                            f"or {data_cfg.get('messages_field') or 'messages'!r} field.")
    if doc_id == 0:
        where = data_cfg.get("hub") or ", ".join(str(p) for p in (data_cfg.get("paths") or []))
        raise UserError(f"the corpus ({where}) holds no documents; add text or fix data.paths.")


# ---- tokens and windows ---------------------------------------------------------------------

def separator_id(tokenizer) -> int | None:
    """The token that ends a plain-text document: `<|endoftext|>` when the vocabulary has it, else EOS."""
    vocab_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(vocab_id, int) and vocab_id != tokenizer.unk_token_id and vocab_id is not None:
        return vocab_id
    return tokenizer.eos_token_id


def tokenize_document(doc: Document, tokenizer) -> list[int]:
    """Token ids of one document.

    Chat documents already hold their special tokens (the template), so no more are added;
    text documents get the tokenizer's usual special tokens plus an end-of-text separator.
    """
    if doc.kind == "chat":
        return list(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(doc.text, add_special_tokens=True)["input_ids"])
    sep = separator_id(tokenizer)
    if sep is not None:
        ids.append(int(sep))
    return ids


def pack_windows(docs: Iterable[Document], tokenizer, ctx_len: int, max_tokens: int | None = None) -> Iterator[Window]:
    """Concatenate the documents' tokens and cut them into windows of exactly `ctx_len` tokens.

    A document longer than the rest of a window continues in the next window. The tail that
    does not fill a last window is dropped. With `max_tokens`, at most that many tokens
    (whole windows only) are produced.
    """
    ctx_len = int(ctx_len)
    if ctx_len < 2:
        raise UserError(f"data.ctx_len is {ctx_len}; use at least 2 tokens per window.")
    limit = None if max_tokens in (None, 0) else int(max_tokens) // ctx_len
    if limit is not None and limit <= 0:
        raise UserError(f"data.max_tokens={max_tokens} is smaller than one window of {ctx_len} tokens; raise "
                        "data.max_tokens or lower data.ctx_len.")
    ids: list[int] = []
    dids: list[int] = []
    pos: list[int] = []
    index = 0
    dropped = 0
    for doc in docs:
        toks = tokenize_document(doc, tokenizer)
        ids.extend(toks)
        dids.extend([doc.doc_id] * len(toks))
        pos.extend(range(len(toks)))
        start = 0
        while len(ids) - start >= ctx_len:
            yield Window(index, ids[start:start + ctx_len], dids[start:start + ctx_len], pos[start:start + ctx_len])
            index += 1
            start += ctx_len
            if limit is not None and index >= limit:
                return
        if start:
            del ids[:start], dids[:start], pos[:start]
    dropped = len(ids)
    if dropped:
        log.info("packed %d windows of %d tokens; dropped the last %d tokens that fill no window",
                 index, ctx_len, dropped)
