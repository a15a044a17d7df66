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


def logprob_prompt(explanation: str, tokens: list[str], scale_max: int) -> tuple[str, int]:
    """The completion prompt and the number of SEPARATORs before the segment's first slot.

    Slot i (the i-th SEPARATOR counted from that number) is where the model would write
    the activation of `tokens[i]`.
    """
    return logprob_prompt_many(explanation, [tokens], scale_max)


def logprob_prompt_many(explanation: str, segments: list[list[str]], scale_max: int) -> tuple[str, int]:
    """One completion prompt for several segments of one latent (each its own <start>..<end> block).

    The slots of all segments follow each other in order after the first `n_before`
    SEPARATORs; with one segment the prompt is exactly `logprob_prompt`'s."""
    lines = [_INTRO.format(top=scale_max), "", "Latent A", f"Explanation: {_EXAMPLE_EXPLANATION}",
             "Activations:", "<start>"]
    lines += [f"{render_token(t)}{SEPARATOR}{_scaled(v, scale_max)}" for t, v in _EXAMPLE]
    lines += ["<end>", "", "Latent B", f"Explanation: {_one_line(explanation)}", "Activations:"]
    for tokens in segments:
        lines.append("<start>")
        lines += [f"{render_token(t)}{SEPARATOR}{PLACEHOLDER}" for t in tokens]
        lines.append("<end>")
    lines += [""]
    return "\n".join(lines), len(_EXAMPLE)


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
