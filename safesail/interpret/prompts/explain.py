"""The explanation prompt: text only, no wire format.

`build_explain_messages` turns a latent's explain-split segments into chat
messages with a few worked examples; which examples, and in what order, rotates
with `rotation` (explain.py derives it from the latent id, and moves it on for
the one retry after a copied reply). `parse_explanation` turns the reply into
one short phrase naming the concept, or raises `ExplanationError` with a reason.
`copied_reason` names a reply that parrots a worked example or echoes the
excerpts (`copied_example`): small models do both. Bump PROMPT_VERSION whenever
the wording changes: explanations are recorded (and resumed) per prompt version.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

PROMPT_VERSION = "explain-v3"  # the parser may change without a bump: `raw` keeps the reply
# v3: the peak tokens are listed with their counts after the excerpts and the question asks about them, not
# the excerpts' topic (Qwen2.5-Coder-1.5B named the topic: "political history" for a latent whose every
# bracket is "attack"); worked examples whose excerpts are about unrelated topics with one shared peak word.
# v2 (`style="v2"`): no peak-token list, the session-1 system text and examples; kept for side-by-side runs
# (benchmarks/bench_explain_prompt.py).

SYSTEM_V2 = (
    "You are an interpretability researcher studying one unit (a latent) of a language model. "
    "You see text excerpts; in each, the tokens where the latent is most active are in [brackets], and "
    "below it every active token is listed with its activation from 0 to 10. Find the concept the active "
    "tokens share (a topic, a kind of word, a piece of grammar or formatting). Answer with a short noun "
    "phrase naming that concept, e.g. \"colour words\", never a sentence about the latent, and never "
    "copy an excerpt or an earlier answer."
)
SYSTEM = (
    "You are an interpretability researcher studying one unit (a latent) of a language model. "
    "You see text excerpts; in each, the tokens where the latent is most active are in [brackets], and "
    "below it every active token is listed with its activation from 0 to 10. Last comes the list of peak "
    "tokens (the most active token of each excerpt) with how many excerpts peak there. Name what the peak "
    "tokens themselves have in common: often one word or its variants, a kind of word, or a piece of "
    "grammar or formatting. The excerpts' topics usually differ and do not matter. Answer with a short noun "
    "phrase, as specific as the tokens allow, e.g. \"colour words\" or \"the word 'water'\", never a sentence "
    "about the latent, never just \"words\", and never copy an excerpt or an earlier answer."
)


@dataclass(frozen=True)
class Example:
    excerpts: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]   # (text, ((active token, level), ...))
    answer: str


# Worked examples, none about the safety domains (politics, pornography, violence, terror), so that a
# parroted example can never pass for a domain latent. Each shows the reply's shape: a concept, no preamble.
EXAMPLES: tuple[Example, ...] = (
    Example(((" She painted the fence bright red and the door blue.", ((" red", 10), (" blue", 8))),
             (" His green scarf matched the grey sky.", ((" green", 9), (" grey", 6)))),
            "colour words"),
    Example(((" Add two cups of flour and a teaspoon of salt.", ((" cups", 10), (" teaspoon", 9))),
             (" The parcel weighed three kilograms.", ((" kilograms", 8),))),
            "units of measurement after a number"),
    Example(((" We met on Tuesday and again in March.", ((" Tuesday", 10), (" March", 7))),
             (" The shop is closed every Sunday.", ((" Sunday", 9),))),
            "days of the week and months"),
    Example(((" The function returns a list of strings.", ((" function", 8), (" returns", 10))),
             (" Call the method before the loop starts.", ((" method", 9), (" loop", 6)))),
            "programming terms"),
    Example((("\"Come in,\" she said. \"Sit down.\"", (("\"", 10), (".\"", 7))),
             (" He asked, \"Where are you going?\"", ((" \"", 9), ("?\"", 8)))),
            "quotation marks around spoken dialogue"),
    Example(((" The soup simmered while she chopped the onions.", ((" simmered", 9), (" chopped", 10))),
             (" Bake the bread until golden, then slice it.", ((" Bake", 10), (" slice", 7)))),
            "cooking actions"),
    Example(((" The nurse brought him a glass of water before the exam.", ((" water", 10),)),
             (" After the match the players poured water over their heads.", ((" water", 9),)),
             (" The bank flooded when the water pipe burst.", ((" water", 8), (" pipe", 3)))),
            "the word 'water'"),
    Example(((" Every morning she goes running in the park.", ((" running", 10),)),
             (" He ran to the station but missed the bus.", ((" ran", 9),)),
             (" The kids run faster than their teacher.", ((" run", 8),))),
            "forms of the verb 'run'"),
    Example(((" The recipe serves 4 people and takes 30 minutes.", ((" 4", 9), (" 30", 10))),
             (" Chapter 12 begins on page 215.", ((" 12", 8), (" 215", 10)))),
            "numbers written as digits"),
)

N_SHOWN = 2   # worked examples in one prompt
N_V2_EXAMPLES = 6   # the v2 prompt's pool: the first six


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


def _quote(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


def _bracketed(tokens: list[str], levels: list[int], top: int) -> str:
    """The excerpt's text with its most active tokens in brackets (within 2 levels of its peak)."""
    cut = top - 2 if top >= 5 else top
    out = []
    for t, s in zip(tokens, levels):
        t = _clean(t)
        if s > 0 and s >= cut:
            lead = t[:len(t) - len(t.lstrip())]
            out.append(f"{lead}[{t.lstrip()}]" if t.strip() else f"[{t}]")
        else:
            out.append(t)
    return "".join(out).strip()


def bracketed_text(tokens: list[str], acts: list[float], max_act: float) -> str:
    """A segment's text with its most active tokens in [brackets] (shared with the tag prompt)."""
    levels = scale_acts(acts, max_act)
    return _bracketed(tokens, levels, max(levels, default=0))


def _excerpt(number: int, tokens: list[str], levels: list[int]) -> str:
    top = max(levels, default=0)
    active = [f"{_quote(_clean(t))} ({s})" for t, s in zip(tokens, levels) if s > 0]
    return (f"Excerpt {number}: {_bracketed(tokens, levels, top)}\n"
            f"Active tokens: {', '.join(active) if active else '(none)'}")


def format_segment(number: int, tokens: list[str], acts: list[float], max_act: float) -> str:
    return _excerpt(number, tokens, scale_acts(acts, max_act))


def example_tokens(text: str) -> list[str]:
    """A crude tokenisation of a worked example: words and runs of punctuation, with their leading space."""
    return re.findall(r"\s*[^\W_]+|\s*[^\w\s]+", text)


def peak_summary(peaks: list[str]) -> str:
    """ "Peak tokens: "attack" (5), "attacks" (2)": the excerpts' most active tokens, counted, most common
    first (delphi-style), so the answer can name the tokens rather than the excerpts' topic. Empty
    tokens (a byte of a multi-byte character) are left out."""
    counts: dict[str, int] = {}
    for t in peaks:
        key = _clean(t).strip() or _clean(t)
        if key:
            counts[key] = counts.get(key, 0) + 1
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    return "Peak tokens: " + (", ".join(f"{_quote(t)} ({n})" for t, n in items) or "(none)")


PEAK_SHARE = 0.5   # the peak list reads the excerpts whose peak is at least this share of the strongest one


def strong_peaks(segments: list[dict]) -> list[str]:
    """The peak token of each excerpt whose peak activation is >= PEAK_SHARE of the strongest excerpt's:
    collect deals excerpts from every activation level, and the weak ones' peaks are mostly noise."""
    tops = [max(s["acts"], default=0.0) for s in segments]
    cut = PEAK_SHARE * max(tops, default=0.0)
    return [_peak(s["tokens"], s["acts"]) for s, a in zip(segments, tops) if a > 0 and a >= cut]


def _peak(tokens: list[str], values: list[float]) -> str:
    """The most active token; when its text is empty (a byte of a character that the next token
    completes, as in Chinese), the text up to the next non-empty token."""
    if not values:
        return ""
    i = max(range(len(values)), key=lambda k: values[k])
    j = i
    while j < len(tokens) - 1 and j - i < 3 and not tokens[j].strip():
        j += 1
    return "".join(tokens[i:j + 1])


def _example_text(ex: Example, peaks: bool = True) -> str:
    parts, tops = [], []
    for i, (text, active) in enumerate(ex.excerpts):
        # Tokenise the example crudely (words with their leading space) so it reads like a real excerpt.
        toks = example_tokens(text)
        level = dict(active)
        levels = [level.get(t, 0) for t in toks]
        parts.append(_excerpt(i + 1, toks, levels))
        tops.append(_peak(toks, levels))
    return "\n\n".join(parts) + (f"\n\n{peak_summary(tops)}" if peaks else "")


QUESTION_V2 = "What concept do the active tokens share?"
QUESTION = "What do the peak tokens have in common?"
STYLES = ("v3", "v2")


def examples_for(rotation: int, n: int = N_SHOWN, style: str = "v3") -> list[Example]:
    """`n` worked examples starting at `rotation` (mod the style's pool), in rotated order."""
    pool = EXAMPLES if style == "v3" else EXAMPLES[:N_V2_EXAMPLES]
    k = len(pool)
    return [pool[(rotation + i) % k] for i in range(min(n, k))]


def build_explain_messages(segments: list[dict], max_act: float, rotation: int = 0,
                           n_examples: int = N_SHOWN, style: str = "v3") -> list[dict]:
    """Chat messages asking what the latent's peak tokens share, given segments with `tokens` and `acts`
    (style="v2": the session-1 prompt, without the peak-token list)."""
    if style not in STYLES:
        raise ValueError(f"unknown explain prompt style {style!r}")
    v3 = style == "v3"
    question = QUESTION if v3 else QUESTION_V2
    msgs = [{"role": "system", "content": SYSTEM if v3 else SYSTEM_V2}]
    for ex in examples_for(rotation, n_examples, style):
        msgs.append({"role": "user", "content": _example_text(ex, v3) + "\n\n" + question})
        msgs.append({"role": "assistant", "content": ex.answer})
    body = "\n\n".join(format_segment(i + 1, s["tokens"], s["acts"], max_act) for i, s in enumerate(segments))
    if v3:
        body += "\n\n" + peak_summary(strong_peaks(segments))
    msgs.append({"role": "user", "content": body + "\n\n" + question})
    return msgs


# ---- parsing -----------------------------------------------------------------------------------------------

_UNIT = r"(?:latent|neuron|unit|feature)"
_VERB = (r"(?:detects|detecting|is detecting|fires on|fires for|responds to|activates on|activates for|"
         r"is active on|is activated by|represents|captures|tracks|encodes|is about|focuses on|identifies)")
_PREFIXES = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+)?(?:answer|explanation|description|summary|response|concept)\s*(?:is)?\s*"
    r"[:\-]\s*|"
    rf"(?:the|this|that)\s+{_UNIT}\s+(?:is\s+)?{_VERB}\s*[:\-]?\s*|"
    rf"{_UNIT}\s+{_VERB}\s*[:\-]?\s*|"
    r"(?:it|they)\s+(?:detects|detect|fires on|responds to|activates on|share|shares)\s*[:\-]?\s*|"
    r"the\s+(?:active\s+)?tokens\s+(?:all\s+)?(?:share|have in common|are)\s*[:\-]?\s*|"
    r"the\s+(?:common\s+|shared\s+)?concept\s+(?:is|shared is)\s*[:\-]?\s*|"
    r"(?:the\s+)?presence\s+of\s+|"
    r"(?:the\s+)?(?:use|usage|occurrence|appearance)\s+of\s+)",
    re.IGNORECASE)


_QUOTES = "\"'`“”‘’"


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
    for _ in range(3):
        line = _PREFIXES.sub("", line).strip()
    line = line.strip().rstrip(".").strip()
    if len(line) > 1 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip().rstrip(".").strip()
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


# ---- copied replies ------------------------------------------------------------------------------------------

_FILLER = {"a", "an", "the", "of", "and", "or", "in", "on", "to", "for", "with", "after", "before"}


def _words(text: str) -> list[str]:
    """Content words, lower-cased, a plural "s" dropped: "Units of measurement" ~ "unit measurement"."""
    words = re.findall(r"[^\W_]+", text.lower())
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
            for w in words if w not in _FILLER]


def _near(a: list[str], b: list[str], cut: float) -> bool:
    return bool(a) and bool(b) and difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= cut


def _longest_run(a: list[str], b: list[str]) -> int:
    m = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return m.size


def copied_reason(explanation: str, excerpts: list[str], near: float = 0.8, echo_words: int = 6) -> str | None:
    """Why the explanation is a copy, or None: equal or near-equal (word-sequence similarity >= `near`) to
    any worked example's answer or excerpt, or echoing an excerpt (a run of >= `echo_words` of its words, or
    80% of a reply of 5+ words). Short replies that quote the excerpt's key words ("victims of violence")
    are what an explanation should be, not copies."""
    words = _words(explanation)
    if not words:
        return None
    for ex in EXAMPLES:
        if _near(words, _words(ex.answer), near):
            return f"the reply repeats the worked example {ex.answer!r}"
        for text, _ in ex.excerpts:
            if _near(words, _words(text), near) or _longest_run(words, _words(text)) >= echo_words:
                return "the reply repeats a worked example's excerpt"
    for i, text in enumerate(excerpts):
        ew = _words(text)
        run = _longest_run(words, ew)
        if run >= echo_words or (len(words) >= 5 and run >= 0.8 * len(words)):
            return f"the reply echoes excerpt {i + 1} ({run} words in a row)"
    return None


_GENERIC = {"word", "token", "text", "term", "phrase", "concept", "thing", "none", "nothing", "variou", "different",
            "common", "random", "letter", "character", "general", "miscellaneou", "unknown", "no", "same"}


def generic_reason(explanation: str) -> str | None:
    """Why the explanation names no concept, or None: all its words are generic ("words", "none",
    "various tokens"), an answer the 1.5B explainer gives to a list it cannot read (`generic_reply`)."""
    words = _words(explanation)
    if words and set(words) <= _GENERIC:
        return f"the reply {explanation!r} names no concept"
    return None

