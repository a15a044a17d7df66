"""The tag prompt: an LLM reads a latent's explanation and names the safety domains it belongs to.

The reply must be JSON `{"domains": [...]}` with zero or more of `DOMAINS`;
`parse_domains` accepts JSON wrapped in prose or a code fence but nothing else
inside it (unknown domains, duplicates, extra keys, non-strings are refused).
"""

from __future__ import annotations

import json

from safesail.interpret.scoring.simulator import SimulationFailure, extract_json_object

PROMPT_VERSION = "tag-v1"
DOMAINS = ("politics", "pornography", "violence", "terror")
_DESCRIPTIONS = {
    "politics": "political figures, parties, governments, elections, protests, sensitive political events",
    "pornography": "sexual content, explicit descriptions, sexual services",
    "violence": "physical harm, weapons, fighting, killing, abuse, self-harm",
    "terror": "terrorism, extremist groups, attacks on civilians, bombs, radicalisation",
}


class TagParseError(ValueError):
    """A tag reply that is not exactly the asked JSON."""


def tag_messages(explanation: str) -> list[dict]:
    domains = "\n".join(f"- {d}: {_DESCRIPTIONS[d]}" for d in DOMAINS)
    system = ("You classify descriptions of latents (neurons) of a language model into safety domains:\n"
              f"{domains}\nA latent belongs to a domain only if its description is clearly about that domain; "
              "most latents (punctuation, grammar, numbers, everyday topics) belong to none. Reply with JSON "
              'only: {"domains": [...]} listing zero or more of ' + ", ".join(DOMAINS) + ".")
    ex_user = "Description: the word 'the' at the start of a sentence"
    ex_user2 = "Description: mentions of guns and shooting people"
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": ex_user},
        {"role": "assistant", "content": json.dumps({"domains": []})},
        {"role": "user", "content": ex_user2},
        {"role": "assistant", "content": json.dumps({"domains": ["violence"]})},
        {"role": "user", "content": "Description: " + " ".join(str(explanation).split())},
    ]


def tag_schema() -> dict:
    return {"name": "safety_domains", "strict": True,
            "schema": {"type": "object", "additionalProperties": False, "required": ["domains"],
                       "properties": {"domains": {"type": "array", "uniqueItems": True,
                                                  "items": {"type": "string", "enum": list(DOMAINS)}}}}}


def parse_domains(text: str) -> list[str]:
    """The domains named by a reply, in `DOMAINS` order; `TagParseError` for anything else."""
    if not isinstance(text, str) or not text.strip():
        raise TagParseError("empty reply")
    if len(text) > 20_000:
        raise TagParseError(f"reply of {len(text)} characters is too long")
    try:
        obj = extract_json_object(text)
    except SimulationFailure:
        raise TagParseError("no JSON object in the reply") from None
    if not isinstance(obj, dict) or set(obj) != {"domains"}:
        raise TagParseError('the JSON is not an object with exactly the key "domains"')
    vals = obj["domains"]
    if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
        raise TagParseError('"domains" is not a list of strings')
    names = [v.strip().lower() for v in vals]
    unknown = [v for v in names if v not in DOMAINS]
    if unknown:
        raise TagParseError(f"unknown domain(s) {unknown[:4]!r}")
    if len(set(names)) != len(names):
        raise TagParseError("a domain is named twice")
    return [d for d in DOMAINS if d in names]
