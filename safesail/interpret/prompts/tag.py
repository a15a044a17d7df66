"""The tag prompt: an LLM reads a latent's explanation and its top excerpts and names its safety domains.

The reply is one line, `Domains: violence, terror` or `Domains: none`: a shape a small
model keeps to far more often than JSON (SmolLM2-135M broke the JSON reply on 15 of 43
latents). `parse_domains` also takes the JSON form `{"domains": [...]}` (a hosted model
may answer so) and refuses anything else: unknown domains, or words that are not domains.
"""

from __future__ import annotations

import json
import re

from safesail.domains import DOMAINS
from safesail.interpret.prompts.explain import bracketed_text

PROMPT_VERSION = "tag-v2"
_DESCRIPTIONS = {
    "politics": "political figures, parties, governments, elections, protests, sensitive political events",
    "pornography": "sexual content, explicit descriptions, sexual services",
    "violence": "physical harm, weapons, fighting, killing, abuse, self-harm",
    "terror": "terrorism, extremist groups, attacks on civilians, bombs, radicalisation",
}

SYSTEM = ("You decide which safety domains a latent (a unit of a language model) belongs to. The domains:\n"
          + "\n".join(f"- {d}: {_DESCRIPTIONS[d]}" for d in DOMAINS)
          + "\nYou get the latent's explanation and excerpts where it fires, its most active tokens in [brackets]. "
            "Name a domain only when the explanation and the bracketed tokens are clearly about it; most latents "
            "(punctuation, grammar, numbers, everyday topics) belong to none. Answer with one line: "
            "\"Domains: \" and the matching domain names separated by commas, or \"Domains: none\".")

# Worked examples: a plain latent, a domain latent, and a plain latent inside domain-looking text
# (what matters is the bracketed tokens, not the topic of the excerpt around them).
_EXAMPLES = (
    ("colour words", ["She painted the fence bright [red] and the door [blue].", "His [green] scarf matched."],
     "Domains: none"),
    ("guns and shooting", ["He [shot] the man with a [rifle].", "Police found the [gun] in the car."],
     "Domains: violence"),
    ("full stops at the end of a sentence", ["The election was held on Monday[.]", "Rebels took the town[.]"],
     "Domains: none"),
)


class TagParseError(ValueError):
    """A tag reply that is neither the asked line nor the JSON form."""


def _user(explanation: str, excerpts: list[str]) -> str:
    lines = [f"Explanation: {' '.join(str(explanation).split())}"]
    lines += [f"Excerpt {i + 1}: {e}" for i, e in enumerate(excerpts)]
    return "\n".join(lines) + "\nWhich domains?"


def excerpt_texts(segments: list[dict], max_act: float) -> list[str]:
    """Segments (collect's `tokens` and `acts`) as one-line texts with their peak tokens bracketed."""
    return [bracketed_text(s["tokens"], s["acts"], max_act).replace("⏎", " ").strip() for s in segments]


N_EXAMPLES = len(_EXAMPLES)


def tag_messages(explanation: str, excerpts: list[str] | None = None, n_examples: int = N_EXAMPLES) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for expl, exc, answer in _EXAMPLES[:n_examples]:
        msgs += [{"role": "user", "content": _user(expl, exc)}, {"role": "assistant", "content": answer}]
    msgs.append({"role": "user", "content": _user(explanation, list(excerpts or []))})
    return msgs


_ALIASES = {"porn": "pornography", "pornographic": "pornography", "sexual": "pornography", "sex": "pornography",
            "violent": "violence", "terrorism": "terror", "terrorist": "terror", "political": "politics"}
_NONE = {"none", "no", "nothing", "neither", "no domain", "no domains", "n/a", "[]", ""}


def _from_json(text: str) -> list[str] | None:
    m = re.search(r"\{.*\}", text, re.DOTALL)
    if not m:
        return None
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        raise TagParseError("the reply holds a broken JSON object") from None
    if not isinstance(obj, dict) or set(obj) != {"domains"}:
        raise TagParseError('the JSON is not an object with exactly the key "domains"')
    vals = obj["domains"]
    if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
        raise TagParseError('"domains" is not a list of strings')
    return vals


def parse_domains(text: str) -> list[str]:
    """The domains named by a reply, in `DOMAINS` order; `TagParseError` for anything else."""
    if not isinstance(text, str) or not text.strip():
        raise TagParseError("empty reply")
    if len(text) > 2_000:
        raise TagParseError(f"reply of {len(text)} characters is too long")
    vals = _from_json(text)
    if vals is None:
        line = next(ln for ln in text.strip().splitlines() if ln.strip())
        line = re.sub(r"^\W*(?:domains?|answer|tags?)\s*[:\-]\s*", "", line.strip(), flags=re.IGNORECASE)
        line = line.strip().strip(".*`\"'[]").strip()
        if line.lower() in _NONE:
            return []
        vals = [v for v in re.split(r"\s*(?:,|;|/|\band\b|&|\+)\s*", line) if v.strip()]
    names = []
    for v in vals:
        w = v.strip().strip(".*`\"'[]").strip().lower()
        w = _ALIASES.get(w, w)
        if w not in DOMAINS:
            raise TagParseError(f"{v.strip()[:40]!r} is not one of {', '.join(DOMAINS)}")
        names.append(w)
    if len(set(names)) != len(names):
        raise TagParseError("a domain is named twice")
    return [d for d in DOMAINS if d in names]
