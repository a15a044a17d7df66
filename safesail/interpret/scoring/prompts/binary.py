"""The layout shared by the yes/no scorers (detection, fuzzing): excerpts in, one yes/no per excerpt out.

Two forms, as for simulation:

* `logprob_prompt`: a few-shot completion prompt; every excerpt is followed by a line
  `Answer <i>:<TAB> unknown`, and the scorer reads, at each TAB, the probabilities of
  the next token being ` yes` or ` no` (or `1`/`0` where those are not one token): one
  forward pass for a whole batch of excerpts.
* `json_messages` + `json_schema` + `parse_answers`: a chat request asking for
  `{"answers": [true, false, ...]}`, one answer per excerpt, in order.

`render_excerpt` writes a segment's tokens as one line (line breaks and TABs escaped, so
only the answer slots hold a TAB), with chosen tokens marked `<<like this>>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from safesail.interpret.scoring.prompts.simulation import PLACEHOLDER, SEPARATOR
from safesail.interpret.scoring.simulator import SimulationFailure, extract_json_object, only_key

YES, NO = " yes", " no"  # after the TAB: a space keeps TAB and answer apart in Qwen's tokenizer ("\tno" is one token)
YES_NO = (YES, NO)
DIGITS = ("1", "0")  # the answers when "yes" or "no" is not one token of the back end's tokenizer
MARK_OPEN, MARK_CLOSE = "<<", ">>"
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\x0b": "\\v", "\x0c": "\\f"}


@dataclass(frozen=True)
class Task:
    """What a yes/no scorer asks: its instruction and worked example (an explanation and answered excerpts)."""
    version: str
    intro: str
    example_explanation: str
    examples: tuple[tuple[str, bool], ...]


def render_excerpt(tokens: list[str], marks: set[int] | frozenset = frozenset()) -> str:
    out = []
    for i, tok in enumerate(tokens):
        text = "".join(_ESCAPES.get(ch, ch) for ch in tok)
        if i in marks:
            lead = text[: len(text) - len(text.lstrip(" "))]
            text = f"{lead}{MARK_OPEN}{text.strip(' ') or text}{MARK_CLOSE}"
        out.append(text)
    return "".join(out).strip() or "\u2205"


def logprob_prompt(task: Task, explanation: str, texts: list[str], words: tuple[str, str] = (YES, NO)
                   ) -> tuple[str, int]:
    """The completion prompt and the number of SEPARATORs (the worked example's) before the first slot.

    `words`: the answers (yes, no); `("1", "0")` for a tokenizer without one-token yes/no."""
    intro = task.intro if words == (YES, NO) else f"{task.intro} Write {words[0]} for yes and {words[1]} for no."
    blank = (" " if words[0].startswith(" ") else "") + PLACEHOLDER
    lines = [intro, "", f"Explanation: {_one_line(task.example_explanation)}"]
    for i, (text, ans) in enumerate(task.examples, 1):
        lines += [f"Excerpt {i}: {text}", f"Answer {i}:{SEPARATOR}{words[0] if ans else words[1]}"]
    lines += ["", f"Explanation: {_one_line(explanation)}"]
    for i, text in enumerate(texts, 1):
        lines += [f"Excerpt {i}: {text}", f"Answer {i}:{SEPARATOR}{blank}"]
    lines += [""]
    return "\n".join(lines), len(task.examples)


def json_messages(task: Task, explanation: str, texts: list[str]) -> list[dict]:
    system = (task.intro + ' Reply with JSON only, in the form {"answers": [true or false, ...]} with one answer '
              "per excerpt, in the given order, and no other keys.")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": _numbered(task.example_explanation, [t for t, _ in task.examples])},
        {"role": "assistant", "content": json.dumps({"answers": [a for _, a in task.examples]})},
        {"role": "user", "content": _numbered(explanation, texts)},
    ]


def json_schema(n: int) -> dict:
    return {"name": "answers", "strict": True,
            "schema": {"type": "object", "additionalProperties": False, "required": ["answers"],
                       "properties": {"answers": {"type": "array", "minItems": n, "maxItems": n,
                                                  "items": {"type": "boolean"}}}}}


_WORDS = {"yes": True, "true": True, "no": False, "false": False}


def parse_answers(text: str, n: int) -> list[bool]:
    """The answers of a JSON reply (booleans; the words yes/no/true/false are taken too)."""
    if not isinstance(text, str) or not text.strip():
        raise SimulationFailure("unparsable_reply", "empty reply")
    answers = only_key(extract_json_object(text), "answers")
    if not isinstance(answers, list):
        raise SimulationFailure("unparsable_reply", '"answers" is not a list')
    if len(answers) != n:
        raise SimulationFailure("count_mismatch", f"{len(answers)} answers for {n} excerpts")
    out = []
    for i, a in enumerate(answers):
        if isinstance(a, bool):
            out.append(a)
        elif isinstance(a, str) and a.strip().lower() in _WORDS:
            out.append(_WORDS[a.strip().lower()])
        else:
            raise SimulationFailure("bad_value", f"answer {i} is {str(a)[:40]!r}, not true or false")
    return out


def _numbered(explanation: str, texts: list[str]) -> str:
    return f"Explanation: {_one_line(explanation)}\nExcerpts:\n" + "\n".join(
        f"{i}. {t}" for i, t in enumerate(texts, 1))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
