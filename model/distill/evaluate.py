"""The fixed eval: teacher-forced agreement of the *served* int8 student with the teacher.

Two kinds of text, because one can fool you: the chat eval (conversations the teacher sampled
on held-out topics, like what distillation trains on) and the general-text eval
(``model.general_text``: standard-library code and docstrings, license prose, which no one
here wrote and no training set holds). Each has short rows, which never leave the local
layers' window, and long ones; for general text the positions past the window are reported
apart, since only they exercise it.

The student is built exactly as serving builds it (``model.loader.build``: int8 weights,
activations and KV), the teacher in float32 as ``pdserve compare`` uses it. Several students
are scored against one teacher pass (``evaluate_many``): the teacher's logits of each row are
computed once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import DEFAULT_WINDOW, QuantConfig
from model.distill.data import DataSpec, chain, load_or_sample
from model.quality import Agreement, Tally, full_logits

EVAL_SPEC = DataSpec("eval", 24, seed=1)
LONG_LEN = 1280  # > the 1024-token window of the local layers


@dataclass
class EvalReport:
    chat_short: Agreement
    chat_long: Agreement | None
    text_short: Agreement | None = None  # None: general text not evaluated
    text_long_in_window: Agreement | None = None  # long rows, positions < window
    text_past_window: Agreement | None = None  # long rows, positions >= window

    def lines(self) -> list[str]:
        out = [f"chat, short (held-out conversations): {self.chat_short}"]
        if self.chat_long is not None:
            out.append(f"chat, long ({LONG_LEN}-token rows): {self.chat_long}")
        if self.text_short is not None:
            out.append(f"general text, short: {self.text_short}")
            out.append(f"general text, long, positions < {DEFAULT_WINDOW}: {self.text_long_in_window}")
            out.append(f"general text, long, positions >= {DEFAULT_WINDOW}: {self.text_past_window}")
        return out

    def worst_top1(self) -> float:
        """The lowest top-1 over every part: what a >= 90% bar must hold on."""
        parts = (self.chat_short, self.chat_long, self.text_short, self.text_long_in_window, self.text_past_window)
        return min(p.top1 for p in parts if p is not None)


@dataclass
class EvalSet:
    chat_short: list[list[int]]
    chat_long: list[list[int]]
    text_short: list[list[int]]
    text_long: list[list[int]]


def eval_sequences(teacher: str, n_short: int | None = None, n_long: int = 2) -> tuple[list, list]:
    seqs = load_or_sample(teacher, EVAL_SPEC)
    return seqs[:n_short] if n_short else seqs, chain(seqs, LONG_LEN)[:n_long]


def eval_set(teacher: str, n_short: int | None = None, n_long: int = 2, general: bool = True) -> EvalSet:
    from model.general_text import passages
    from model.loader import load

    short, long = eval_sequences(teacher, n_short, n_long)
    if not general:
        return EvalSet(short, long, [], [])
    tok = load(teacher, quant=QuantConfig.off()).tokenizer
    if tok is None:
        raise ValueError(f"teacher {teacher!r} has no tokenizer to encode the general-text eval")
    text_short, text_long = passages(tok.encode)
    return EvalSet(short, long, [p.tokens for p in text_short], [p.tokens for p in text_long])


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


def evaluate_many(teacher_model, students: dict, data: EvalSet, progress=None) -> dict[str, EvalReport]:
    """One EvalReport per student (name -> model); the teacher runs once per row."""
    names = list(students)
    tallies = {n: {k: Tally() for k in ("cs", "cl", "ts", "tin", "tpast")} for n in names}
    rows = [("cs", s) for s in data.chat_short] + [("cl", s) for s in data.chat_long] + \
        [("ts", s) for s in data.text_short] + [("tl", s) for s in data.text_long]
    for i, (kind, seq) in enumerate(rows):
        t = full_logits(teacher_model, seq)
        for n in names:
            s = full_logits(students[n], seq)
            if kind == "tl":
                tallies[n]["tin"].add(t[:DEFAULT_WINDOW], s[:DEFAULT_WINDOW])
                tallies[n]["tpast"].add(t[DEFAULT_WINDOW:], s[DEFAULT_WINDOW:])
            else:
                tallies[n][kind].add(t, s)
        if progress is not None:
            progress(i + 1, len(rows))
    out = {}
    for n in names:
        r = {k: (v.result() if v.n else None) for k, v in tallies[n].items()}
        out[n] = EvalReport(r["cs"], r["cl"], r["ts"], r["tin"], r["tpast"])
    return out


def evaluate(teacher: str, student: str, delta: str | Path | None, n_short: int | None = None,
             n_long: int = 2, general: bool = True) -> EvalReport:
    from model.loader import load

    data = eval_set(teacher, n_short, n_long, general)
    t = load(teacher, quant=QuantConfig.off()).model
    with torch.inference_mode():
        return evaluate_many(t, {student: served_student(student, delta)}, data)[student]
