"""Tokenizer from a GGUF's byte-level BPE vocabulary and merges, and its chat template."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_start|>


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None = None
    _literal: HFTokenizer | None = field(default=None, repr=False, compare=False)  # encode_text's backend

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest token in bytes: byte-level BPE spells each byte as one character of the vocabulary
        (added tokens are their own ASCII text), so it is the longest vocabulary string."""
        return max(len(t) for t in self.backend.get_vocab(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` read as plain text: a string that spells a special token (``<|im_start|>``)
        becomes ordinary tokens, never the control token."""
        if self._literal is None:
            self._literal = HFTokenizer.from_str(self.backend.to_str())
            self._literal.encode_special_tokens = True
        return self._literal.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The chat prompt as ids: the template's own markers as control tokens, each message's content
        as plain text (``encode_text``), so no content can open or close a turn (forge a system turn).

        The template is rendered with a placeholder per content; the text between placeholders is the
        template's and is encoded with its specials. Same ids as encoding the rendered string whenever
        no content spells a special token (the template puts a special or a newline at every seam).
        """
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        rendered = self.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                            add_generation_prompt)
        ids, at = [], 0
        for m, mark in zip(messages, marks):
            cut = rendered.find(mark, at)
            if cut < 0:
                raise ValueError("the chat template drops or reorders message contents")
            ids += self.encode(rendered[at:cut]) + self.encode_text(m["content"])
            at = cut + len(mark)
        return ids + self.encode(rendered[at:])

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Renders role-tagged messages with the model's own (Jinja) template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must have 'role' and 'content'")
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer of a GGUF file, from its parsed header (shared with the weights of the same load and
        cached on disk by ``model.weights``: building from the vocabulary takes ~0.1 s, parsing it seconds)."""
        from model.weights import WeightFileError, read_gguf_header

        header = read_gguf_header(path)
        meta = header.metadata
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise WeightFileError(f"{path}: tokenizer {meta.get('tokenizer.ggml.model')!r} is not byte-level BPE")
        missing = [k for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
                   if k not in header.vocab]
        if missing:
            raise WeightFileError(f"{path}: no {', '.join(missing)}")
        tokens: list[str] = header.vocab["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in header.vocab["tokenizer.ggml.merges"]]
        return cls.from_vocab(tokens, merges, header.vocab["tokenizer.ggml.token_type"], meta)

    @classmethod
    def from_vocab(cls, tokens: list[str], merges: list[tuple[str, str]], types: list[int],
                   meta: dict[str, Any]) -> "Tokenizer":
        backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if meta.get("tokenizer.ggml.pre") == "smollm":
            # SmolLM's own tokenizer (and llama.cpp's 'smollm' pre-type) splits digits one by one.
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
        backend.decoder = decoders.ByteLevel()
        specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
        backend.add_special_tokens(specials)
        return cls(backend, meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"),
                   meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str | Path, bos: int | None, eos: int | None) -> "Tokenizer | None":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json")), bos, eos, hf_chat_template(path))


def hf_chat_template(path: Path) -> str | None:
    """The chat template of an HF directory: transformers 4 keeps it in tokenizer_config.json (a string, or
    a list of named templates, of which we take "default"); transformers 5 writes chat_template.jinja."""
    cfg = path / "tokenizer_config.json"
    template = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    jinja = path / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text()
    return template or None


class TextSoFar:
    """The text of a growing list of token ids, decoding only its last few tokens per addition.

    Decoding the whole output at every token costs O(n) per step, O(n^2) per request: ~250 us for
    1,000 SmolLM2 tokens, so ~32 ms of host time a decode step at batch 128 (``benchmarks/detok.py``).
    Here the ids already turned into text that ends on a whole character are *settled*; a step decodes
    the last few settled ids (as context: a decoder may treat a leading token differently) with the new
    ids and keeps what follows the context's own text. For byte-level BPE (and the character codec)
    ``text`` equals decoding every id at once (tests/test_detok.py compares them at each step); a
    decoder for which the context's text is not a prefix of the window's falls back to a full decode.
    A tail that ends in U+FFFD (an unfinished UTF-8 character) stays unsettled and is decoded again.
    """

    CONTEXT = 4  # at most this many settled ids are decoded again with the new ones

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""
        self._settled = ""  # the text of ids[:_read]
        self._context, self._prefix, self._read = "", 0, 0  # the text of ids[_prefix:_read], decoded again

    def add(self, ids: list[int]) -> str:
        """Append ``ids``; the text of all ids so far."""
        self.ids.extend(ids)
        window = self._decode(self.ids[self._prefix:])
        if window.startswith(self._context):
            self.text = self._settled + window[len(self._context):]
            next_prefix = max(self._read, len(self.ids) - self.CONTEXT)
        else:  # not a concatenating decoder, at least here: decode everything, no context after it
            self.text, next_prefix = self._decode(self.ids), len(self.ids)
        if len(self.text) > len(self._settled) and not self.text.endswith("\ufffd"):
            self._prefix, self._read, self._settled = next_prefix, len(self.ids), self.text
            self._context = self._decode(self.ids[self._prefix:self._read]) if self._prefix < self._read else ""
        return self.text
