"""Token texts and roles (system / template / query / answer) of a diagnosed chat."""

from __future__ import annotations

from safesail.chat import format_chat


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds; a token ending inside a multi-byte character gets "" and the
    token that completes the character carries it whole."""
    pieces: list[str] = []
    start = 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[start:i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and i + 1 < len(ids) and i + 1 - start < 8:
            pieces.append("")
            continue
        pieces.append(text)
        start = i + 1
    return pieces


def encode_prompt(tokenizer, query: str, system_prompt: str | None) -> tuple[list[int], list[str]]:
    """Token ids of the chat prompt (with the generation prompt) and each token's role."""
    text = format_chat(tokenizer, query, system_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    q0 = text.rfind(query)
    q1 = q0 + len(query)
    s0 = text.find(system_prompt) if system_prompt else -1
    s1 = s0 + len(system_prompt) if s0 >= 0 else -1
    roles = []
    for a, b in enc["offset_mapping"]:
        if q0 >= 0 and a >= q0 and b <= q1 and b > a:
            roles.append("query")
        elif s0 >= 0 and a >= s0 and b <= s1 and b > a:
            roles.append("system")
        else:
            roles.append("template")
    return ids, roles
