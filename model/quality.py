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


@dataclass
class Tally:
    """Sums over positions, turned into an Agreement at the end."""

    agree: int = 0
    kl: float = 0.0
    n: int = 0

    def add(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
        self.agree += int((teacher_logits.argmax(-1) == student_logits.argmax(-1)).sum())
        lt, ls = torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1)
        self.kl += float((lt.exp() * (lt - ls)).sum())
        self.n += teacher_logits.shape[0]

    def result(self) -> Agreement:
        return Agreement(self.n, self.agree / max(self.n, 1), self.kl / max(self.n, 1))


def full_logits(model: Transformer, tokens: list[int] | torch.Tensor) -> torch.Tensor:
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    with torch.inference_mode():
        return model(tokens, ContiguousKVCache(model.config, len(tokens)).extend(len(tokens)))


def compare(teacher: Transformer, student: Transformer, sequences: list[list[int]]) -> Agreement:
    return compare_split(teacher, student, sequences, split_at=0)[1]


def compare_split(teacher: Transformer, student: Transformer, sequences: list[list[int]],
                  split_at: int) -> tuple[Agreement, Agreement]:
    """Agreement at positions before ``split_at`` and from it on (e.g. past a sliding window)."""
    before, after = Tally(), Tally()
    for seq in sequences:
        t, s = full_logits(teacher, seq), full_logits(student, seq)
        before.add(t[:split_at], s[:split_at])
        after.add(t[split_at:], s[split_at:])
    return before.result(), after.result()
