"""Chat formatting shared by the cache, select, collect and diagnose stages."""

from __future__ import annotations


def chat_messages(query: str, system_prompt: str | None = None, answer: str | None = None) -> list[dict]:
    msgs = []
    if system_prompt:
        msgs.append({"role": "system", "content": system_prompt})
    msgs.append({"role": "user", "content": query})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def format_chat(tokenizer, query: str, system_prompt: str | None = None, answer: str | None = None) -> str:
    """The text the model sees for a user query (with the generation prompt when no answer is given)."""
    msgs = chat_messages(query, system_prompt, answer)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)


def encode_chat(tokenizer, query: str, system_prompt: str | None = None, answer: str | None = None) -> list[int]:
    text = format_chat(tokenizer, query, system_prompt, answer)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
