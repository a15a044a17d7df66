"""Helpers shared by the corpus and cache tests: a small deterministic corpus, snapshots of folders."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

_EN = ("the river city market bread school music winter garden history station library "
       "mountain travel recipe science museum letter window morning festival").split()
_ZH = list("我们今天天气很好学校图书馆历史音乐城市河流面包早上")
_HI = "नमस्ते भारत किताब पानी स्कूल इतिहास संगीत शहर नदी सुबह".split()


def write_corpus(folder: Path, n: int = 240, seed: int = 0) -> Path:
    """A corpus of plain text, bare queries and chat records in English, Chinese and Hindi."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        lang = ["en", "zh", "hi"][i % 3]
        if lang == "en":
            words = " ".join(rng.choices(_EN, k=rng.randint(10, 60)))
        elif lang == "zh":
            words = "".join(rng.choices(_ZH, k=rng.randint(8, 30)))
        else:
            words = " ".join(rng.choices(_HI, k=rng.randint(6, 30)))
        kind = i % 4
        if kind in (0, 1):
            rec = {"text": words.capitalize() + ".", "lang": lang, "domain": "benign"}
        elif kind == 2:
            rec = {"query": f"What about {words}?", "lang": lang, "domain": "politics"}
        else:
            rec = {"messages": [{"role": "user", "content": words},
                                {"role": "assistant", "content": words[::-1]}], "lang": lang, "domain": "benign"}
        lines.append(json.dumps(rec, ensure_ascii=False))
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under a folder with a hash of its content (to prove nothing was overwritten)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_sentence(msg: str) -> None:
    msg = msg.strip()
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    assert msg.endswith("."), msg
