"""Text <-> token ids at the gateway: the model's own tokenizer, or bytes for tokenizer-less models.

Random-weight presets such as ``skv-tiny`` ship no tokenizer, yet the gRPC API takes text and
chat messages; a character codec lets them serve text end to end, with a ChatML-like template,
so tests exercise the same paths as real models. It is a bijection on token ids: id = ord(c) + 3
for the 256 Latin-1 characters, and any other id shows as ``<|tN|>`` and reads back as N. So a
random model's reply, sent back as the next chat turn, re-encodes to the very tokens generated,
and the turn extends the previous one exactly (its KV is in the cache).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_MARK = re.compile(r"<\|t(0|[1-9]\d*)\|>")  # no leading zeros: one spelling per id

from model.tokenizer import TextSoFar, Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass
class Codec:
    tokenizer: Tokenizer | None
    vocab_size: int
    eos_token_id: int | None

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one id can stand for (a floor on any text's token count)."""
        if self.tokenizer is not None:
            return self.tokenizer.max_token_bytes
        return max(2, len(f"<|t{self.vocab_size}|>"))  # a Latin-1 character (<= 2 bytes), or a marker

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer is None or bool(self.tokenizer.chat_template)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(text)
        ids, at = [], 0
        for m in _MARK.finditer(text):
            ids += _chars(text[at:m.start()])
            ids.append(int(m.group(1)))
            at = m.end()
        return ids + _chars(text[at:])

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return "".join(chr(i - 3) if 3 <= i < 259 else f"<|t{i}|>" for i in ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A model's tokenizer keeps message contents as plain text (``Tokenizer.encode_chat``). The
        character codec has no control tokens to forge: its template is characters too."""
        if self.tokenizer is not None:
            return self.tokenizer.encode_chat(messages)
        return self.encode("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
                           + "<|im_start|>assistant\n")


def _chars(text: str) -> list[int]:
    """Latin-1 characters one id each; others as their UTF-8 bytes (one id per byte)."""
    return [ord(c) + 3 if ord(c) < 256 else b + 3 for c in text for b in ([0] if ord(c) < 256 else c.encode())]


class Detokenizer:
    """Incremental detokenization: emits only text that a later token cannot still change (a text ending in
    an unfinished UTF-8 character waits). Decodes only the last few ids per call (``TextSoFar``)."""

    def __init__(self, codec: Codec):
        self.text, self.shown = TextSoFar(codec.decode), 0

    def add(self, ids: list[int]) -> str:
        text = self.text.add(ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.shown = text[self.shown:], len(text)
        return delta

    def flush(self) -> str:
        text = self.text.text
        delta, self.shown = text[self.shown:], len(text)
        return delta
