"""The fixed, seeded eval: teacher-forced agreement of the *served* int8 student with the teacher.

The student is built exactly as serving builds it (``model.loader.build``: int8 weights,
activations and KV), the teacher in float32 as ``pdserve compare`` uses it. Short
conversations and long (> window) chained conversations are reported separately, since
only the long ones exercise the sliding-window layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import QuantConfig
from model.distill.data import DataSpec, chain, load_or_sample
from model.quality import Agreement, compare

EVAL_SPEC = DataSpec("eval", 24, seed=1)
LONG_LEN = 1280  # > the 1024-token window of the local layers


@dataclass
class EvalReport:
    short: Agreement
    long: Agreement | None

    def lines(self) -> list[str]:
        out = [f"short (held-out conversations): {self.short}"]
        if self.long is not None:
            out.append(f"long ({LONG_LEN}-token rows): {self.long}")
        return out


def eval_sequences(teacher: str, n_short: int | None = None, n_long: int = 2) -> tuple[list, list]:
    seqs = load_or_sample(teacher, EVAL_SPEC)
    return seqs[:n_short] if n_short else seqs, chain(seqs, LONG_LEN)[:n_long]


def served_student(student: str, delta: str | Path | None, quant: QuantConfig | None = None):
    """The student as serving runs it, with ``delta`` applied (None: the untrained conversion)."""
    from model.distill.delta import apply_delta
    from model.distill.train import preset_state
    from model.loader import build

    config, state = preset_state(student)
    config = config.with_quant(quant or QuantConfig())
    if delta is not None:
        state = apply_delta(delta, config, state)
    return build(config, state)


def evaluate(teacher: str, student: str, delta: str | Path | None, n_short: int | None = None,
             n_long: int = 2) -> EvalReport:
    from model.loader import load

    short, long = eval_sequences(teacher, n_short, n_long)
    t = load(teacher, quant=QuantConfig.off()).model
    s = served_student(student, delta)
    with torch.inference_mode():
        return EvalReport(compare(t, s, short), compare(t, s, long) if long else None)
