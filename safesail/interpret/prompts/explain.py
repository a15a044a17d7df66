"""The explanation prompt: text only, no wire format.

`build_explain_messages` turns a latent's explain-split segments into chat
messages; `parse_explanation` turns the reply into one short line or raises
`ExplanationError` with a reason. Bump PROMPT_VERSION whenever the wording
changes: explanations are recorded (and resumed) per prompt version.
"""

from __future__ import annotations

import re

PROMPT_VERSION = "explain-v1"  # the parser may change without a bump: `raw` keeps the reply

SYSTEM = (
    "You are an interpretability researcher. You study one unit (a latent) of a language model. "
    "You are shown text excerpts; after each excerpt, the tokens where the latent is active are listed "
    "with its activation on a scale from 0 to 10. Find what the active tokens have in common and describe, "
    "in a few words, what the latent detects. Answer with one short English phrase only."
)

# One worked example, so that even a small model answers in the expected shape.
EXAMPLE_USER = (
    "Excerpt 1: I adopted a puppy and two kittens last spring.\n"
    "Active tokens: \" puppy\" (10), \" kittens\" (8)\n\n"
    "Excerpt 2: The farmer fed the horses before dawn.\n"
    "Active tokens: \" horses\" (9)\n\n"
    "What does the latent detect?"
)
EXAMPLE_ASSISTANT = "names of animals, especially pets and farm animals"

_PREFIXES = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+)?(?:answer|explanation|description|summary|response)\s*[:\-]\s*|"
    r"(?:the\s+)?(?:latent|neuron|unit|feature)\s+(?:is\s+)?(?:detects|detecting|fires on|responds to|"
    r"activates on|activates for|is active on|represents|captures|tracks)\s*[:\-]?\s*|"
    r"it\s+(?:detects|fires on|responds to|activates on)\s*[:\-]?\s*|"
    r"this\s+(?:latent|neuron|unit|feature)\s+(?:detects|fires on|responds to|activates on)\s*[:\-]?\s*)",
    re.IGNORECASE)


class ExplanationError(Exception):
    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


def scale_acts(acts: list[float], max_act: float) -> list[int]:
    """Activations scaled to integers 0..10 by the latent's maximum."""
    if max_act <= 0:
        return [0] * len(acts)
    return [max(0, min(10, int(10 * a / max_act + 0.5))) for a in acts]


def _clean(tok: str) -> str:
    return tok.replace("\n", "⏎").replace("\r", "").replace("\t", " ")


def format_segment(number: int, tokens: list[str], acts: list[float], max_act: float) -> str:
    scaled = scale_acts(acts, max_act)
    text = "".join(_clean(t) for t in tokens).strip()
    active = [f"{_quote(_clean(t))} ({s})" for t, s in zip(tokens, scaled) if s > 0]
    return f"Excerpt {number}: {text}\nActive tokens: {', '.join(active) if active else '(none)'}"


def _quote(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


def build_explain_messages(segments: list[dict], max_act: float) -> list[dict]:
    """Chat messages asking what the latent detects, given segments with `tokens` and `acts`."""
    body = "\n\n".join(format_segment(i + 1, s["tokens"], s["acts"], max_act) for i, s in enumerate(segments))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": EXAMPLE_USER},
            {"role": "assistant", "content": EXAMPLE_ASSISTANT},
            {"role": "user", "content": body + "\n\nWhat does the latent detect?"}]


def _latin_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if c.isascii() or "\u00c0" <= c <= "\u024f") / len(letters)


def parse_explanation(reply: str, max_chars: int = 200, language: str | None = "en") -> str:
    """The first non-empty line of the reply, prefixes and quotes stripped, at most `max_chars`."""
    if reply is None or not reply.strip():
        raise ExplanationError("empty_reply", "the model returned no text")
    line = next((ln for ln in reply.strip().splitlines() if ln.strip()), "")
    line = line.strip().strip("*#>-• ").strip()
    for _ in range(2):
        line = _PREFIXES.sub("", line).strip()
    line = line.strip().rstrip(".").strip().strip("\"'`“”").strip().rstrip(".").strip()
    # Keep the first sentence: small models run on ("... a word. In this case, the latent ...").
    end = re.search(r"[.!?]\s+[A-Z]", line)
    if end:
        line = line[:end.start()].strip()
    if not any(c.isalpha() for c in line):
        raise ExplanationError("malformed_reply", f"no words in the reply {reply[:80]!r}")
    if language == "en" and _latin_share(line) < 0.5:
        raise ExplanationError("wrong_language", f"the reply is not in English: {line[:80]!r}")
    if len(line) > max_chars:
        cut = line[:max_chars].rsplit(" ", 1)[0]
        line = cut if cut else line[:max_chars]
    return line
