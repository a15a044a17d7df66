"""The text of each token, for display and for LLM prompts.

Byte-level BPE splits a Chinese or Hindi character over several tokens; decoding
such a token alone gives U+FFFD. `token_pieces` gives each token the text it adds
in context: a token ending inside a character gets "" and the token completing the
character carries it whole, so joining the pieces gives back the text.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
_MAX_PENDING = 8  # a UTF-8 character spans at most 4 bytes; give up on longer runs


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    pieces: list[str] = []
    start = 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[start:i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith(REPLACEMENT) and i + 1 < len(ids) and i + 1 - start < _MAX_PENDING:
            pieces.append("")
            continue
        pieces.append(text)
        start = i + 1
    return pieces


def drop_incomplete_tail(tokenizer, ids: list[int]) -> list[int]:
    """A generation cut at its limit: `ids` without the last tokens if they hold only the first bytes of a
    character (it would end in U+FFFD). One that ended itself (a special token last) is left whole."""
    if not ids or ids[-1] in set(tokenizer.all_special_ids):
        return ids
    return ids[:len(ids) - incomplete_tail(tokenizer, ids)]


def incomplete_tail(tokenizer, ids: list[int]) -> int:
    """How many trailing tokens hold only the first bytes of a character (0 if the text ends whole;
    also 0 when more than three do, which is no split character but invalid bytes)."""
    for n in range(min(len(ids), 3) + 1):
        text = tokenizer.decode(ids[:len(ids) - n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not text.endswith(REPLACEMENT):
            return n
    return 0
