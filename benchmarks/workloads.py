"""The three engine workloads of issue 15 (and ../shared/anchors.md), the same for every engine.

Prompts are random in-vocabulary tokens (``benchmarks.common.random_prompts``), greedy, EOS
ignored, so every engine generates exactly ``output`` tokens per request.
"""
from __future__ import annotations

import dataclasses

from benchmarks.common import random_prompts


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch: int  # requests submitted together
    prompt: int  # tokens per request after the shared part
    output: int  # generated tokens per request
    shared: int = 0  # tokens of a prefix every request starts with (prefix reuse when > 0)
    seed: int = 0

    def shared_prompt(self) -> list[int]:
        return random_prompts(1, self.shared, seed=self.seed + 1000)[0] if self.shared else []

    def prompts(self) -> list[list[int]]:
        head = self.shared_prompt()
        return [head + p for p in random_prompts(self.batch, self.prompt, seed=self.seed)]

    @property
    def prompt_tokens(self) -> int:
        return self.batch * (self.shared + self.prompt)


WORKLOADS = {
    "a": Workload("(a) 32 x 512 -> 128", batch=32, prompt=512, output=128, seed=2),
    "b": Workload("(b) 1 x 512 -> 128", batch=1, prompt=512, output=128, seed=1),
    "c": Workload("(c) 16 x (1,500 shared + 32) -> 32", batch=16, prompt=32, output=32, shared=1500, seed=3),
}
