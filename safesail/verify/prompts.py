"""Open-ended neutral prompts for the sufficiency check (`verify.sufficiency_prompts: open`).

The default neutral queries are the neutral twins of the bundled concept pairs: specific tasks ("How do
observers check a bird census for errors?") whose answers the question constrains tightly. The steering
literature tests sufficiency where the model is free to choose its topic (generic prompts, a neutral prefix
such as "I think"), so this file offers such prompts instead. A prompts file is JSON Lines, one prompt a line:

    {"id": "open-eval-en-01", "lang": "en", "split": "eval", "prompt": "Tell me a story."}

`split` is `eval` (steered and judged) or `scan` (the strength scan only: a strength is never chosen on the
prompts it is judged on). Blank lines and lines starting with `#` are skipped; any problem is one sentence
(UserError) naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safesail.errors import UserError

DEFAULT_OPEN_PROMPTS = "data/queries/open_prompts.jsonl"
SOURCES = ("twins", "open")
SPLITS = ("eval", "scan")
FIELDS = ("id", "lang", "split", "prompt")


@dataclass(frozen=True)
class OpenPrompt:
    id: str
    lang: str
    split: str
    prompt: str


def load_open_prompts(path: str | Path | None = None) -> list[OpenPrompt]:
    from safesail.train.pairs import resolve_data_path

    p = resolve_data_path(path, DEFAULT_OPEN_PROMPTS)
    if not p.is_file():
        raise UserError(f"the open prompts file {p} does not exist; point verify.open_prompts at a JSONL file of "
                        f"prompts ({DEFAULT_OPEN_PROMPTS} is bundled).")
    out, seen = [], set()
    with open(p, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{p} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not valid JSON ({e.msg}); write one JSON object per line.") from None
            if not isinstance(rec, dict) or any(not isinstance(rec.get(k), str) or not rec[k].strip() for k in FIELDS):
                raise UserError(f"{where} needs the text fields {', '.join(FIELDS)}, each non-empty.")
            if rec["split"] not in SPLITS:
                raise UserError(f"{where} has the split {rec['split']!r}; use eval (judged) or scan (strength scan).")
            if rec["id"] in seen:
                raise UserError(f"{where} repeats the id {rec['id']!r}; give every prompt a unique id.")
            seen.add(rec["id"])
            out.append(OpenPrompt(*(rec[k].strip() for k in FIELDS)))
    if not any(x.split == "eval" for x in out):
        raise UserError(f"the open prompts file {p} holds no eval prompts; add some with \"split\": \"eval\".")
    return out


def by_lang(prompts: list[OpenPrompt], split: str, langs: list[str]) -> dict[str, list[OpenPrompt]]:
    """The prompts of one split per language (file order), only the given languages."""
    return {lang: [x for x in prompts if x.split == split and x.lang == lang] for lang in langs}
