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
