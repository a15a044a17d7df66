"""Token texts and roles (system / template / query / answer) of a diagnosed chat."""

from __future__ import annotations

from safesail.chat import format_chat


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
