"""The CPU's int8 GEMM routes side by side: ``torch._int_mm``, exact float32 GEMMs, and C (kernels.cpu_gemm).

    python -m benchmarks.int8_gemm_routes [--rounds 3] [--rows 1,8,32,512] [--json]

Every route gives the same integers (tests/test_cpu_gemm.py); this measures what each costs on
this machine: the GEMM alone at SmolLM2's layer shapes, then engine steps of SmolLM2 int8
(a prefill of 512 tokens, decode steps at batch 1 and 8 with 512 tokens of context) under each
route (``PDSERVE_INT8_GEMM``; "C" is the C rows route up to 8 rows, the C panels beyond). The
routes alternate within every round, so a drift of the machine's speed hits all; figures are
medians over the rounds, with float/int and C/float ratios. Without the C library the C column is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from benchmarks.common import machine
from benchmarks.decode_steps import placed_engine, step_time
from benchmarks.profile_steps import prefill_engine
from kernels import cpu_fused, cpu_gemm, gemm_plan

SHAPES = {"qkv 576->960": (576, 960), "gate_up 576->3072": (576, 3072), "down 1536->576": (1536, 576),
          "lm_head 576->49152": (576, 49152)}
ROUTES = ("int", "float", "c") if cpu_fused.available() else ("int", "float")


def _route(mode: str) -> None:
    """Switch this process's plan: plan() re-reads PDSERVE_INT8_GEMM once its cache is cleared."""
    os.environ["PDSERVE_INT8_GEMM"] = mode
    gemm_plan.plan.cache_clear()


def gemm_ms(k: int, n: int, m: int, mode: str) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    wt, wf, xf, packed = w.t(), cpu_gemm.float_weight(w), x.float(), cpu_gemm.pack_weight(w)

    def fn() -> None:
        if mode == "int":
            torch._int_mm(x, wt)
        elif mode == "float":
            cpu_gemm.int_mm_via_float(xf, wf)
        elif m <= cpu_gemm.C_MAX_ROWS:
            cpu_gemm.int_mm_rows_c(xf, w)
        else:
            cpu_gemm.int_mm_panels_c(xf, packed, n)

    fn()
    reps = max(1, min(20, int(2e8 // (m * k * n))))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def engine_ms(model, what: str) -> float:
    if what == "prefill 1 x 512":
        engine = prefill_engine(model, 1, 512)
        t0 = time.perf_counter()
        engine.step()
        return (time.perf_counter() - t0) * 1e3
    batch = int(what.split()[2])
    return step_time(model, batch, 512, steps=3) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default="1,8,32,512")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    points = [(name, k, n, m) for name, (k, n) in SHAPES.items() for m in rows if m * k * n <= 2**31]
    times: dict[tuple, dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for name, k, n, m in points:
            for mode in ROUTES:
                times.setdefault((f"GEMM {name}", m), {}).setdefault(mode, []).append(gemm_ms(k, n, m, mode))
        print(f"  GEMM round {r + 1} done", file=sys.stderr, flush=True)
    if not args.skip_engine:
        from model.loader import load

        model = load("smollm2-135m").model
        placed_engine(model, 1, 64, steps=1)  # first-call allocations
        for r in range(args.rounds):
            for what in ("prefill 1 x 512", "decode batch 1", "decode batch 8"):
                for mode in ROUTES:
                    _route(mode)
                    times.setdefault((f"engine {what}", 0), {}).setdefault(mode, []).append(engine_ms(model, what))
            print(f"  engine round {r + 1} done", file=sys.stderr, flush=True)
    table = [{"what": what, "rows": m, **{mode: statistics.median(v) for mode, v in t.items()}}
             for (what, m), t in times.items()]
    for row in table:
        row["float/int"] = row["float"] / row["int"]
        if "c" in row:
            row["C/float"] = row["c"] / row["float"]
    if args.json:
        print(json.dumps({"machine": machine(), "rounds": args.rounds, "table": table}, indent=1))
        return
    with_c = "c" in ROUTES
    print(machine(), f"medians of {args.rounds} alternated rounds")
    print("| what | rows (M) | torch._int_mm ms | float32 route ms | float / int |" + (" C ms | C / float |" if with_c else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if with_c else ""))
    for row in table:
        c = f" {row['c']:.2f} | {row['C/float']:.3f} |" if with_c else ""
        print(f"| {row['what']} | {row['rows'] or ''} | {row['int']:.2f} | {row['float']:.2f} | {row['float/int']:.3f} |{c}")


if __name__ == "__main__":
    main()
