"""Teacher-forced comparison of two models: top-1 agreement and mean KL(teacher || student)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.kv_cache import ContiguousKVCache
from model.transformer import Transformer


@dataclass
class Agreement:
    tokens: int
    top1: float  # fraction of positions where both argmaxes agree
    kl: float  # mean KL(teacher || student) in nats

    def __str__(self) -> str:
        return f"top-1 agreement {self.top1:.1%}, mean KL {self.kl:.4f} nats over {self.tokens} positions"


def full_logits(model: Transformer, tokens: list[int] | torch.Tensor) -> torch.Tensor:
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    with torch.inference_mode():
        return model(tokens, ContiguousKVCache(model.config, len(tokens)).extend(len(tokens)))


def compare(teacher: Transformer, student: Transformer, sequences: list[list[int]]) -> Agreement:
    agree, kl_sum, n = 0, 0.0, 0
    for seq in sequences:
        t, s = full_logits(teacher, seq), full_logits(student, seq)
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
        kl_sum += float((lt.exp() * (lt - ls)).sum())
        n += len(seq)
    return Agreement(n, agree / n, kl_sum / n)
