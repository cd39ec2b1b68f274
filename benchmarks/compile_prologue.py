"""Does torch.compile pay on this CPU? The int8 linear's prologue (Hadamard rotation + per-row quantize), eager vs inductor.

    python -m benchmarks.compile_prologue [--rows 1,8,33,512] [--reps 200]

The prologue is where a batch-1 decode step spends its small ops (``QLinear.forward``: the
butterfly passes of ``hadamard_rotate`` and ``quantize_rows_float``), so it is the first thing
to fuse. This checks the two things that decide it: that the compiled code gives the eager
bits (batch invariance and ``--no-compile`` bit-compatibility depend on it; inductor's CPU code
is built with ``-ffp-contract=off`` and no unsafe math, and every op here rounds once) and
whether it is faster, with the compile time. ``hadamard_rotate`` itself is written as views
whose sizes depend on the row count, which sends dynamo's symbolic shapes into minutes of
sympy; the same butterflies on a ``[M, K/b, 2, ..., 2]`` view compile.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from kernels.reference import quantize_rows_float
from model.quant import hadamard_block, hadamard_rotate


def butterflies(x: torch.Tensor, block: int) -> torch.Tensor:
    """``hadamard_rotate`` with static dims but M: the same adds in the same order (bit-identical)."""
    m, k = x.shape
    levels = int(math.log2(block))
    y = x.reshape(m, k // block, *([2] * levels))
    for d in range(levels):  # most significant bit first, as hadamard_rotate's half = block/2, /4, ...
        a, c = y.select(2 + d, 0), y.select(2 + d, 1)
        y = torch.stack((a + c, a - c), dim=2 + d)
    return y.reshape(m, k) * block**-0.5


def eager(x: torch.Tensor, block: int):
    return quantize_rows_float(hadamard_rotate(x.float(), block))


def traceable(x: torch.Tensor, block: int):
    return quantize_rows_float(butterflies(x.float(), block))


def per_call_us(fn, x, block: int, reps: int) -> float:
    fn(x, block)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(x, block)
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,8,33,512")
    ap.add_argument("--widths", default="576,1536", help="input widths K (SmolLM2: 576, FFN 1536)")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    compiled = torch.compile(traceable, dynamic=True)
    print(f"{torch.__version__}, {torch.get_num_threads()} threads")
    print("| K | rows M | bit-identical to eager (and to M=1) | eager us | compiled us | compiled / eager |")
    print("|---:|---:|---|---:|---:|---:|")
    for k in map(int, args.widths.split(",")):
        block = hadamard_block(k)
        t0 = time.perf_counter()
        compiled(torch.randn(3, k), block)
        print(f"compile at K={k}: {time.perf_counter() - t0:.1f} s")
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k) * 3
            (a, sa), (c, sc) = eager(x, block), compiled(x, block)
            alone = compiled(x[:1].clone(), block)[0]
            same = torch.equal(a, c) and torch.equal(sa, sc) and torch.equal(alone, c[:1])
            e_us, c_us = per_call_us(eager, x, block, args.reps), per_call_us(compiled, x, block, args.reps)
            print(f"| {k} | {m} | {same} | {e_us:.0f} | {c_us:.0f} | {c_us / e_us:.2f} |", flush=True)


if __name__ == "__main__":
    main()
