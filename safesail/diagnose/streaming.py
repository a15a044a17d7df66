"""Streaming the answer while it is generated: a transformers streamer that hands out text pieces."""

from __future__ import annotations

from transformers.generation.streamers import BaseStreamer


class CallbackStreamer(BaseStreamer):
    """Calls `on_text(piece)` with each complete piece of new text (never half a multi-byte character).

    The first `put` carries the prompt and is skipped; special tokens are left out of the text.
    """

    def __init__(self, tokenizer, on_text):
        self.tok = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = 0
        self.seen_prompt = False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        # A generation cut at its limit inside a character: leave out the incomplete tail (the engine drops it too).
        from safesail.token_text import drop_incomplete_tail

        text = self.tok.decode(drop_incomplete_tail(self.tok, self.ids), skip_special_tokens=True)
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)
