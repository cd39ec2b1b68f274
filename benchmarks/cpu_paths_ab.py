"""In-process A/B of the CPU engine's optional paths on SmolLM2 int8: steps of one engine, the variants toggled
step by step, so the machine's drift (on the Intel AMX VM, up to ~1.5x within minutes) cancels in each pair.

    python -m benchmarks.cpu_paths_ab [--decode-batches 1,4,32] [--prefill 1x512,4x512,1x2048] [--gemm-rows 2048,256]
                                      [--rounds 30]

Variants (each is the one before it plus one change; the last is the default engine):
- ``one thread``: the C rows GEMM (decode) on one thread below m * n * k = 2**22, the rule before the 64 KiB one
- ``threads``: every weight of 64 KiB or more split across the threads
- ``one-call linear``: the rotated linear's prologue and rows GEMM in one C call
- ``C RoPE/norm``: RoPE and RMSNorm's tail as C calls (the default, with oneDNN below)
Prefill rows compare ``_int_mm`` with oneDNN's prepacked matmul from 512 rows (``kernels.gemm_plan.onednn_from``),
then (where the CPU has AMX) the attention on AMX tiles (``kernels/cpu_attention_amx.c``; the two before it with
``PDSERVE_CPU_AMX=off``), and ``--gemm-rows`` the two kernels alone on SmolLM2's four layer weights (int8 sums, no epilogue).
Each line: the median step per variant and the median of the paired ratios against the first.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch

import kernels
from benchmarks.common import machine
from benchmarks.decode_steps import placed_engine
from benchmarks.profile_steps import prefill_engine
from kernels import cpu_fused, cpu_gemm, gemm_plan


_REAL = (gemm_plan.plan, cpu_gemm._rows_threads, kernels.fused_linear, kernels.small_ops_in_c)  # the default engine's


_AMX = os.environ.get("PDSERVE_CPU_AMX")  # read by the C attention on every call


def _amx(mode: str | None) -> None:
    if mode is None:
        os.environ.pop("PDSERVE_CPU_AMX", None)
    else:
        os.environ["PDSERVE_CPU_AMX"] = mode


def _restore() -> None:
    gemm_plan.plan, cpu_gemm._rows_threads, kernels.fused_linear, kernels.small_ops_in_c = _REAL
    _amx(_AMX)


def _decode_variants() -> dict[str, Callable[[], None]]:
    _, threads, linear, small = _REAL

    def old_threads(m: int, n: int, k: int) -> int:
        return torch.get_num_threads() if m * n * k >= 2**22 else 1

    def use(rows_threads, fused_linear, small_ops) -> Callable[[], None]:
        return lambda: (setattr(cpu_gemm, "_rows_threads", rows_threads),
                        setattr(kernels, "fused_linear", fused_linear), setattr(kernels, "small_ops_in_c", small_ops))

    def off(*_):
        return False

    return {"one thread": use(old_threads, off, off), "threads": use(threads, off, off),
            "one-call linear": use(threads, linear, off), "C RoPE/norm": use(threads, linear, small)}


def _prefill_variants() -> dict[str, Callable[[], None]]:
    plan = _REAL[0]()
    plans = {"_int_mm": (dataclasses.replace(plan, onednn_from=gemm_plan.ALWAYS), "off"),
             "oneDNN from 512 rows": (dataclasses.replace(plan, onednn_from=gemm_plan.PREFILL_PROBE_ROWS), "off")}
    if cpu_fused.amx():
        plans["AMX attention"] = (plans["oneDNN from 512 rows"][0], "auto")
    return {name: (lambda p=p, amx=amx: (setattr(gemm_plan, "plan", lambda: p), _amx(amx)))
            for name, (p, amx) in plans.items()}


GEMM_SHAPES = ((3072, 576), (960, 576), (576, 1536), (576, 576))  # SmolLM2's gate/up, QKV, down, O: [N, K]


def gemm_kernels(rows: int, rounds: int) -> None:
    """``torch._int_mm`` (which packs the weight on every call) against oneDNN's matmul on a weight packed once."""
    gen = torch.Generator().manual_seed(0)
    for n, k in GEMM_SHAPES:
        forms = cpu_gemm.WeightForms(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen))
        x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=gen)
        calls = {"_int_mm": lambda: torch._int_mm(x, forms.wq.t()), "oneDNN": lambda: cpu_gemm.onednn_int_mm(x, forms)}
        chosen = {}
        for f in calls.values():
            f()  # warm-up: oneDNN's packing, its primitive
        pick = {name: (lambda f=f: chosen.update(step=f)) for name, f in calls.items()}
        interleaved(f"GEMM {rows} x {k} -> {n}", pick, lambda: chosen["step"], rounds)


def interleaved(label: str, variants: dict[str, Callable[[], None]], make_step: Callable[[], Callable[[], object]],
                rounds: int) -> None:
    names, times = list(variants), {name: [] for name in variants}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            variants[name]()
            step = make_step()
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    _restore()  # the next comparison starts from the default engine
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(times[names[0]], times[name]))
        print(f"| {label} | {name} | {statistics.median(times[name]) * 1e3:.1f} | {ratio:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-batches", default="1,4,32")
    parser.add_argument("--prefill", default="1x512,4x512,1x2048")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--gemm-rows", default="2048,256", help="row counts for the GEMM kernels alone")
    parser.add_argument("--rounds", type=int, default=30, help="decode steps per variant (prefill: a fifth)")
    args = parser.parse_args()
    from model.loader import load

    model = load("smollm2-135m").model
    print(f"{machine()}\n{gemm_plan.plan().describe()}\n")
    print("| step | variant | median ms | speed-up over the first (paired) |\n|---|---|---:|---:|")
    try:
        for b in (int(x) for x in args.decode_batches.split(",") if x):
            engine = placed_engine(model, b, args.context, steps=len(_decode_variants()) * args.rounds + 4)
            interleaved(f"decode b{b}, {args.context} context", _decode_variants(), lambda: engine.step, args.rounds)
        for shape in (s for s in args.prefill.split(",") if s):
            batch, context = (int(x) for x in shape.split("x"))
            prefill_engine(model, batch, context).step()  # warm-up: the plan, the packed weights
            interleaved(f"prefill {batch} x {context}", _prefill_variants(),
                        lambda: prefill_engine(model, batch, context).step, max(2, args.rounds // 5))
        if cpu_gemm.onednn_usable():
            for rows in (int(x) for x in args.gemm_rows.split(",") if x):
                gemm_kernels(rows, args.rounds)
    finally:
        _restore()


if __name__ == "__main__":
    main()
