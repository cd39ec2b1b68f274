"""The C attention over int8 paged KV against the torch reference, in the engine: decode steps and prefills.

    OMP_NUM_THREADS=1 python -m benchmarks.cpu_attention [--batches 1,8,32] [--contexts 512,2048] [--rounds 3]

Both paths give the same bits (tests/test_cpu_attention.py); this measures what the C one saves.
The two alternate within each round, in one process; figures are medians over rounds of the median
decode step (SmolLM2 int8, ``batch`` sequences placed at ``context`` tokens) and of one prefill of a
``context``-token prompt. With one torch thread the clock is this thread's CPU time
(``time.thread_time``: robust to other work on the machine, and the C loops then run on this
thread too); with more, wall time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine, print_ab_table
from benchmarks.decode_steps import placed_engine
from benchmarks.fused_prologue import greedy
from benchmarks.profile_steps import prefill_engine
from kernels import cpu_attention


def _clock():
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def decode_ms(model, batch: int, context: int, steps: int = 3) -> float:
    engine, clock = placed_engine(model, batch, context, steps), _clock()
    times = []
    for _ in range(steps):
        t = clock()
        engine.step()
        times.append(clock() - t)
    return statistics.median(times) * 1e3


def prefill_s(model, context: int) -> float:
    engine, clock = prefill_engine(model, 1, context), _clock()
    t = clock()
    engine.step()
    return clock() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--no-prefill", action="store_true")
    a = ap.parse_args()
    from model.loader import load

    if not cpu_attention.usable(torch.zeros(1, 9, 64), torch.zeros(1, 1, 3, 64, dtype=torch.int8), torch.zeros(1)):
        raise SystemExit("the C attention is not available here (no compiler, or turned off): nothing to compare")
    model = load(a.model).model
    built = cpu_attention.usable
    modes = {"torch": lambda *args: False, "C": built}
    contexts, batches = [int(c) for c in a.contexts.split(",")], [int(b) for b in a.batches.split(",")]
    figures: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    tokens = {}
    for r in range(a.rounds):
        for mode, choose in modes.items():
            cpu_attention.usable = choose
            for context in contexts:
                for b in batches:
                    figures[mode].setdefault(f"decode step b{b} ctx{context} ms", []).append(decode_ms(model, b, context))
                if not a.no_prefill:
                    figures[mode].setdefault(f"prefill {context} tokens s", []).append(prefill_s(model, context))
            tokens.setdefault(mode, greedy(model))
            print(f"  round {r + 1} {mode} done", flush=True)
    cpu_attention.usable = built
    clock = "thread CPU time" if torch.get_num_threads() == 1 else f"wall time, {torch.get_num_threads()} threads"
    print_ab_table(figures, tokens, f"{machine()}, {a.model} int8, {time.strftime('%Y-%m-%d %H:%M')}, {clock}, "
                   f"median of {a.rounds} alternated rounds", ("torch", "C"), ("torch reference", "C"))


if __name__ == "__main__":
    main()
