"""Single-sequence generation over a contiguous cache: the reference the paged engine must match."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from model.engine.sampling import Sampler, SamplingParams
from model.kv_cache import ContiguousKVCache
from model.transformer import Transformer


def check_prompt(model: Transformer, prompt: list[int], max_tokens: int) -> None:
    limit = model.config.max_seq_len
    if not prompt:
        raise ValueError("prompt is empty: at least one token is needed")
    if len(prompt) + max_tokens > limit:
        raise ValueError(f"prompt of {len(prompt)} tokens plus max_tokens={max_tokens} exceeds the model's "
                         f"context of {limit} tokens")


@torch.inference_mode()
def generate(model: Transformer, prompt: list[int], sampling: SamplingParams = SamplingParams(),
             stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yields generated token ids one at a time; stops at a stop id (not yielded) or max_tokens."""
    check_prompt(model, prompt, sampling.max_tokens)
    sampler = Sampler(sampling)
    cache = ContiguousKVCache(model.config, len(prompt) + sampling.max_tokens)
    tokens = torch.tensor(prompt, dtype=torch.long)
    logits = model(tokens, cache.extend(len(prompt)), logits_at=torch.tensor([len(prompt) - 1]))
    for _ in range(sampling.max_tokens):
        token = sampler.sample(logits[-1])
        if token in stop_ids:
            return
        yield token
        logits = model(torch.tensor([token]), cache.extend(1))
