"""The simulation prompts: an LLM reads an explanation and predicts a latent's activation per token.

Two forms, one per simulator mode (see `safesail/interpret/scoring/simulator.py`):

* `logprob_prompt`: a raw completion prompt (few-shot) in which every token of the
  segment sits on its own line as `token<TAB>unknown`. The simulator reads, at each
  TAB, the model's probabilities for the next token being `0`, `1`, ... `scale_max`
  and takes the expected value: one forward pass per segment.
* `json_messages` + `json_schema`: a chat request asking for
  `{"activations": [{"token": ..., "activation": ...}, ...]}` for chat-only back ends.

Tokens are rendered with `render_token` so that a line break, tab or trailing space
inside a token cannot break the line layout (or merge with the TAB in tokenisation).
"""

from __future__ import annotations

import json

PROMPT_VERSION = "sim-v1"
PLACEHOLDER = "unknown"
SEPARATOR = "\t"

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\x0b": "\\v", "\x0c": "\\f"}

# One short worked example (values on a 0..10 scale; rescaled to the mode's scale).
_EXAMPLE_EXPLANATION = "words about food and eating"
_EXAMPLE = [("I", 0), (" like", 0), (" eating", 6), (" pizza", 10), (" with", 0), (" my", 0),
            (" friends", 0), (" after", 0), (" lunch", 7), (".", 0)]

# style "v2": three worked latents, none about the safety domains, each with two short segments in
# which most tokens are 0 and the few that fit the explanation are high (a word-level latent, a
# topic latent, a formatting latent), so the layout of several segments is shown too.
_V2 = (
    ("the word \"river\" and names of rivers",
     ([("We", 0), (" walked", 0), (" along", 0), (" the", 0), (" river", 10), (" bank", 2), (" until", 0),
       (" sunset", 0), (".", 0)],
      [("The", 0), (" Nile", 9), (" and", 0), (" the", 0), (" Amazon", 8), (" are", 0), (" very", 0),
       (" long", 0), (".", 0)])),
    ("numbers in prices and amounts of money",
     ([("It", 0), (" costs", 1), (" $", 4), ("12", 9), (" at", 0), (" the", 0), (" shop", 0), (".", 0)],
      [("She", 0), (" has", 0), (" two", 0), (" cats", 0), (" and", 0), (" a", 0), (" dog", 0), (".", 0)])),
    ("the start of an item in a list",
     ([("You", 0), (" need", 0), (":", 0), ("\n", 3), ("-", 10), (" flour", 0), ("\n", 3), ("-", 10),
       (" sugar", 0)],)),
)
# style -> (worked latents, whether each segment's text is shown on one line before its token lines,
#           the placeholder written after every TAB of the segments to simulate)
STYLES = {"v1": (((_EXAMPLE_EXPLANATION, (_EXAMPLE,)),), False, PLACEHOLDER), "v2": (_V2, False, PLACEHOLDER),
          "v3": (_V2, True, PLACEHOLDER), "v4": (_V2, False, "0"), "v5": (_V2, True, "0"),
          "v6": (_V2, False, PLACEHOLDER), "v7": (_V2, True, PLACEHOLDER),
          "v8": (((_EXAMPLE_EXPLANATION, (_EXAMPLE,)),), False, PLACEHOLDER)}
# styles whose answers are the words yes (the latent fires: a worked value >= 4 of 10) / no, not digits
YES_NO = {"v6", "v7", "v8"}
YES, NO = "Yes", "No"  # capitalised: Qwen merges a TAB with "no" into one token, not with "No"


def answer_words(style: str, scale_max: int) -> list[str]:
    """The one-token answers read at every slot: "0".."scale_max", or yes/no."""
    return [YES, NO] if style in YES_NO else [str(v) for v in range(scale_max + 1)]


def _answer(style: str, v: int, scale_max: int) -> str:
    return (YES if v >= 4 else NO) if style in YES_NO else str(_scaled(v, scale_max))
DEFAULT_STYLE = "v1"

_INTRO_YES_NO = ("We study latents (neurons) inside a language model. Each latent looks for one particular "
                 "thing in a text. Given an explanation of what a latent looks for, say for each token whether "
                 "the latent fires on it: Yes or No. Most tokens get No.")
_INTRO = ("We study latents (neurons) inside a language model. Each latent looks for one particular "
          "thing in a text. Given an explanation of what a latent looks for, predict how strongly it "
          "fires on each token, as a whole number from 0 (not at all) to {top} (as strongly as it ever "
          "does). Most tokens get 0.")


def render_token(tok: str) -> str:
    """A token as one visible line fragment: control characters escaped, trailing whitespace shown."""
    out = "".join(_ESCAPES.get(ch, ch) for ch in tok)
    stripped = out.rstrip(" ")
    if len(stripped) != len(out):
        out = stripped + "\u2423" * (len(out) - len(stripped))  # visible-space sign for trailing spaces
    return out if out else "\u2205"  # empty token


def _scaled(v: int, scale_max: int) -> int:
    return int(round(v * scale_max / 10))


def logprob_prompt(explanation: str, tokens: list[str], scale_max: int,
                   style: str = DEFAULT_STYLE) -> tuple[str, int]:
    """The completion prompt and the number of SEPARATORs before the segment's first slot.

    Slot i (the i-th SEPARATOR counted from that number) is where the model would write
    the activation of `tokens[i]`.
    """
    return logprob_prompt_many(explanation, [tokens], scale_max, style)


def logprob_prompt_many(explanation: str, segments: list[list[str]], scale_max: int,
                        style: str = DEFAULT_STYLE) -> tuple[str, int]:
    """One completion prompt for several segments of one latent (each its own <start>..<end> block).

    The slots of all segments follow each other in order after the first `n_before`
    SEPARATORs; with one segment the prompt is exactly `logprob_prompt`'s. `style` picks the
    worked examples (`STYLES`)."""
    if style not in STYLES:
        raise ValueError(f"unknown simulation prompt style {style!r}; use one of {', '.join(STYLES)}")
    examples, show_text, placeholder = STYLES[style]
    lines = [_INTRO_YES_NO if style in YES_NO else _INTRO.format(top=scale_max), ""]
    n_before = 0
    for i, (expl, segs) in enumerate(examples):
        lines += [f"Latent {chr(ord('A') + i)}", f"Explanation: {expl}", "Activations:"]
        for seg in segs:
            lines += _block([t for t, _ in seg], [_answer(style, v, scale_max) for _, v in seg], show_text)
            n_before += len(seg)
        lines.append("")
    lines += [f"Latent {chr(ord('A') + len(examples))}", f"Explanation: {_one_line(explanation)}", "Activations:"]
    for tokens in segments:
        lines += _block(tokens, [placeholder] * len(tokens), show_text)
    lines += [""]
    return "\n".join(lines), n_before


def _block(tokens: list[str], values: list[str], show_text: bool) -> list[str]:
    """One segment's lines: (its text on one line,) <start>, `token<TAB>value` per token, <end>."""
    head = [f"Text: {_one_line(''.join(tokens))}"] if show_text else []
    return head + ["<start>"] + [f"{render_token(t)}{SEPARATOR}{v}" for t, v in zip(tokens, values)] + ["<end>"]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def json_messages(explanation: str, tokens: list[str], scale_max: int) -> list[dict]:
    """Chat messages asking for the predicted activations as JSON."""
    example_in = [t for t, _ in _EXAMPLE]
    example_out = {"activations": [{"token": t, "activation": _scaled(v, scale_max)} for t, v in _EXAMPLE]}
    system = (_INTRO.format(top=scale_max) + " Reply with JSON only, in the form "
              '{"activations": [{"token": <the token, copied exactly>, "activation": <number>}, ...]} '
              "with one entry per given token, in the given order, and no other keys.")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Explanation: {_EXAMPLE_EXPLANATION}\nTokens: "
                                    f"{json.dumps(example_in, ensure_ascii=False)}"},
        {"role": "assistant", "content": json.dumps(example_out, ensure_ascii=False)},
        {"role": "user", "content": f"Explanation: {_one_line(explanation)}\nTokens: "
                                    f"{json.dumps(list(tokens), ensure_ascii=False)}"},
    ]


def json_schema(n_tokens: int, scale_max: int) -> dict:
    """JSON schema of the expected reply (sent to back ends that support structured output)."""
    return {
        "name": "simulated_activations",
        "strict": True,
        "schema": {
            "type": "object",
            "additionalProperties": False,
            "required": ["activations"],
            "properties": {
                "activations": {
                    "type": "array",
                    "minItems": n_tokens,
                    "maxItems": n_tokens,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["token", "activation"],
                        "properties": {
                            "token": {"type": "string"},
                            "activation": {"type": "number", "minimum": 0, "maximum": scale_max},
                        },
                    },
                },
            },
        },
    }


def json_messages_many(explanation: str, segments: list[list[str]], scale_max: int) -> list[dict]:
    """Chat messages asking for the predicted activations of several segments at once, as JSON."""
    example_out = {"segments": [{"activations": [{"token": t, "activation": _scaled(v, scale_max)}
                                                 for t, v in _EXAMPLE]}]}
    system = (_INTRO.format(top=scale_max) + " Reply with JSON only, in the form "
              '{"segments": [{"activations": [{"token": <the token, copied exactly>, "activation": <number>}, ...]}, '
              "...]} with one entry per given segment, in order, and in each one entry per token, in order, and no "
              "other keys.")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": _segments_text(_EXAMPLE_EXPLANATION, [[t for t, _ in _EXAMPLE]])},
        {"role": "assistant", "content": json.dumps(example_out, ensure_ascii=False)},
        {"role": "user", "content": _segments_text(explanation, segments)},
    ]


def _segments_text(explanation: str, segments: list[list[str]]) -> str:
    return f"Explanation: {_one_line(explanation)}\nSegments:\n" + "\n".join(
        f"{i}. Tokens: {json.dumps(list(t), ensure_ascii=False)}" for i, t in enumerate(segments, 1))


def json_schema_many(lengths: list[int], scale_max: int) -> dict:
    """JSON schema of a several-segment reply: len(lengths) segments, each of the one-segment form
    (per-segment token counts are checked by the parser: tuple schemas are not widely honoured)."""
    seg = json_schema(1, scale_max)["schema"]
    del seg["properties"]["activations"]["minItems"], seg["properties"]["activations"]["maxItems"]
    return {"name": "simulated_activations_many", "strict": True,
            "schema": {"type": "object", "additionalProperties": False, "required": ["segments"],
                       "properties": {"segments": {"type": "array", "minItems": len(lengths),
                                                   "maxItems": len(lengths), "items": seg}}}}
