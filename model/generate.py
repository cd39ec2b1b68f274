"""Single-sequence generation over a contiguous cache: the reference the paged engine must match."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.kv_cache import ContiguousKVCache
from model.transformer import Transformer


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")


def check_prompt(model: Transformer, prompt: list[int], max_tokens: int) -> None:
    limit = model.config.max_seq_len
    if not prompt:
        raise ValueError("prompt is empty: at least one token is needed")
    if len(prompt) + max_tokens > limit:
        raise ValueError(f"prompt of {len(prompt)} tokens plus max_tokens={max_tokens} exceeds the model's "
                         f"context of {limit} tokens")


@torch.inference_mode()
def generate(model: Transformer, prompt: list[int], sampling: Sampling = Sampling(),
             stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yields generated token ids one at a time; stops at a stop id (not yielded) or max_tokens."""
    sampling.validate()
    check_prompt(model, prompt, sampling.max_tokens)
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    cache = ContiguousKVCache(model.config, len(prompt) + sampling.max_tokens)
    tokens = torch.tensor(prompt, dtype=torch.long)
    logits = model(tokens, cache.extend(len(prompt)), logits_at=torch.tensor([len(prompt) - 1]))
    for _ in range(sampling.max_tokens):
        token = sample(logits[-1], sampling.temperature, gen)
        if token in stop_ids:
            return
        yield token
        logits = model(torch.tensor([token]), cache.extend(1))


def sample(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


class TextStream:
    """Turns a token stream into text deltas, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, decode):
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[self.emitted:], len(text)
        return delta
