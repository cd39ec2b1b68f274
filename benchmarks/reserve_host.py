"""Host time of the scheduler's per-step KV reservations, this tree against a git revision's scheduler.

    OMP_NUM_THREADS=1 python -m benchmarks.reserve_host --base 585d1fb [--batch 128] [--context 8192] [--rounds 6]

A decode step reserves one slot per sequence in every KV group and frees the blocks local windows left
(``Scheduler._reserve``): Python work per sequence and group that a replayed CUDA graph step waits on.
Both versions run on the same state and this tree's block pool (``cai-13b-skv``'s 24 KV groups, a model too
small to matter: only the scheduler runs), 64 steps per round so each sequence crosses a block boundary, rounds
alternated. Thread time, medians. (Until 2026-11-28's seventh session the revision's arm called the revision's
``_reserve`` but this tree's ``_drop_out_of_window``, so its figure for 585d1fb was too low: 7.0 ms, 17.1 since.)
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

from benchmarks.common import machine
from benchmarks.gpu_engine import _decoding_engine, _pool_bytes
from model.engine import scheduler
from model.loader import build, random_state
from model.presets import get_preset

ROOT = Path(__file__).resolve().parent.parent


def scheduler_at(rev: str) -> type:
    """The ``Scheduler`` class of ``model/engine/scheduler.py`` at git revision ``rev``."""
    text = subprocess.run(["git", "show", f"{rev}:model/engine/scheduler.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    module = types.ModuleType(f"scheduler_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(text, f"{rev}:model/engine/scheduler.py", "exec"), module.__dict__)
    return module.Scheduler


def step_ms(cls: type, model, batch: int, context: int, steps: int = 64) -> float:
    """Thread time of ``steps`` decode steps' reservations for ``batch`` sequences, per step."""
    engine = _decoding_engine(model, batch, context, _pool_bytes(model.config, batch, context), steps + 4,
                              graphs="off")
    sched, seqs = engine.scheduler, list(engine.scheduler.running)
    sched.__class__ = cls  # every method the reservation calls is the revision's (not only ``_reserve``)
    t = time.thread_time()
    for _ in range(steps):
        for seq in seqs:
            if not sched._reserve(seq, 1):
                raise RuntimeError("the pool ran out of blocks: raise _pool_bytes' margin")
            seq.computed += 1
    return (time.thread_time() - t) / steps * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision whose scheduler is the baseline")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(get_preset("cai-13b-skv"), dim=128, n_heads=4, n_kv_heads=1, head_dim=32, ffn_dim=128,
                              vocab_size=1024, weights=None)
    model = build(cfg, random_state(cfg, 0))
    arms = {args.base: scheduler_at(args.base), "this tree": scheduler.Scheduler}
    times = {k: [] for k in arms}
    for r in range(args.rounds):
        for label in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            times[label].append(step_ms(arms[label], model, args.batch, args.context))
    base, this = (statistics.median(times[k]) for k in arms)
    print(f"{machine()}; {len(cfg.kv_groups)} KV groups, batch {args.batch}, context {args.context}; thread time, "
          f"medians of {args.rounds}")
    print(f"reservations per decode step: {args.base} {base:.2f} ms, this tree {this:.2f} ms ({base / this:.2f}x)")


if __name__ == "__main__":
    main()
