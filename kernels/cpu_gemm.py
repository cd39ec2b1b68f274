"""Exact int8 GEMM through float32 where the CPU's int8 path is slow, chosen by measurement.

``torch._int_mm`` on CPU is as fast as the machine's int8 units: with VNNI or AMX it beats
float32, without them (AVX2 only) it runs ~20x slower than an fp32 GEMM of the same shape,
and even with them it loses to fp32 at a single row. A float32 GEMM of int8 values can give
the same integers: every product is exact (|q| <= 128, so |x*w| <= 2**14), and as long as
no partial sum can pass 2**24 every addition is exact in any order, so the result is the
integer sum whatever the BLAS kernel, blocking or batch. ``EXACT_K`` is the longest K for
which that holds (1024 * 128 * 128 = 2**24); longer K goes in chunks whose exact partial
results add in float64. So both paths give the same bits and batch invariance is untouched;
only speed and memory differ (the float path holds a float32 copy of each int8 weight, 4x
its bytes).

At a few rows (decode) the float path reads 4 bytes a weight; where the C library is built
(``kernels.cpu_fused``) ``int_mm_rows_c`` reads the int8 weight itself and gives the same integers
(16-bit multiply-adds, int32 sums), 2-10x faster at up to 8 rows on an AVX2 machine.

Which path runs is a per-process plan: ``PDSERVE_INT8_GEMM=int`` or ``=float`` forces one;
``auto`` (the default) times them at start-up (first use, ~0.1-0.3 s) for a few row counts:
the C rows path up to the largest probed count (<= ``C_MAX_ROWS``) at which it beats both others,
the float path below the smallest count at which ``_int_mm`` wins, ``_int_mm`` from there.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import torch

from kernels import cpu_fused  # the C library (the rows path); built on first use

EXACT_K = 1024  # K per float32 chunk: every partial sum stays within 2**24, exact in float32
PROBE_ROWS = (1, 16, 128)  # row counts the start-up measurement compares
C_PROBE_ROWS = (1, 4, 8)  # ... and those at which the C rows path may run
C_MAX_ROWS = 8
PROBE_K, PROBE_N = 576, 576
NEVER, ALWAYS = 0, 2**62


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    """Rows (M) below ``float_below`` take the float32 path; the rest ``torch._int_mm``."""

    float_below: int
    source: str  # "env" or "measured"
    timings_ms: dict[int, tuple[float, ...]] = dataclasses.field(default_factory=dict)  # M -> (int_mm, float[, C])
    c_through: int = 0  # rows up to this take the C rows path (which wants the float path's inputs)

    def use_float(self, rows: int) -> bool:
        """Whether these rows take float inputs: the float path, or the C rows path."""
        return rows < self.float_below or rows <= self.c_through

    def use_c_rows(self, rows: int) -> bool:
        return rows <= self.c_through

    def describe(self) -> str:
        rule = {NEVER: "torch._int_mm always", ALWAYS: "float32 always"}.get(
            self.float_below, f"float32 below {self.float_below} rows, torch._int_mm from there")
        if self.c_through:
            rule = f"C on int8 weights up to {self.c_through} rows, then {rule}"
        probes = ", ".join(f"M={m}: " + " / ".join(f"{name} {t:.2f}" for name, t in zip(("int", "float", "C"), ts)) + " ms"
                           for m, ts in self.timings_ms.items())
        return f"int8 GEMM on CPU: {rule} ({self.source}{'; ' + probes if probes else ''})"


def float_weight(wq: torch.Tensor) -> torch.Tensor:
    """The float32 copy of an int8 weight [N, K] the float path multiplies by: [K, N], contiguous."""
    return wq.t().to(torch.float32).contiguous()


def int_mm_via_float(xq: torch.Tensor, wq_float: torch.Tensor) -> torch.Tensor:
    """``xq @ wq.T`` as exact integers in a float tensor [M, N] (float32 up to EXACT_K, float64 beyond).

    ``xq`` is int8, or its integers in float32 (``quantize_rows_float``); ``wq_float`` is
    ``float_weight(wq)``. Chunks are of equal size so no chunk exceeds EXACT_K.
    """
    k = xq.shape[1]
    x = xq if xq.dtype == torch.float32 else xq.to(torch.float32)
    if k <= EXACT_K:
        return x @ wq_float
    size = math.ceil(k / math.ceil(k / EXACT_K))
    acc = None
    for s in range(0, k, size):
        part = (x[:, s:s + size] @ wq_float[s:s + size]).double()
        acc = part if acc is None else acc + part
    return acc


def int_mm_rows_c(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``xq @ wq.T`` [M, N] float32 for up to ``C_MAX_ROWS`` rows of integers in float32 ([M, K]) and the int8
    weight [N, K]: the float path's integers, each rounded once to float32 (as its epilogue does)."""
    m, k, n = xq.shape[0], xq.shape[1], wq.shape[0]
    x = xq.to(torch.float32).contiguous()
    wq = wq.contiguous()
    out = torch.empty((m, n), dtype=torch.float32)
    threads = torch.get_num_threads() if m * n * k >= 2**22 else 1  # a thread's start costs ~a small GEMV
    with cpu_fused.profiled("pdserve::int8_gemm_c"):
        status = cpu_fused.library().pdserve_int8_gemm_rows(x.data_ptr(), m, k, wq.data_ptr(), n, out.data_ptr(), threads)
    if status:
        raise ValueError({-1: f"C int8 GEMM: {m} rows or K={k} out of its range",
                          -4: "C int8 GEMM: out of memory",
                          -5: "C int8 GEMM: the rows must hold integers in [-127, 127]"}.get(status, f"status {status}"))
    return out


def _best_ms(fn, reps: int = 5) -> float:
    """The fastest of a few calls: what the path costs when nothing else takes the cores (a busy
    machine at start-up must not make the plan pick the slow path for good)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def measure() -> GemmPlan:
    """Time both paths at PROBE_ROWS on a SmolLM2-sized layer; float runs below where _int_mm first wins.

    On one torch thread: what the probe compares is each path's arithmetic on this CPU. With
    several OpenMP threads on cores that another process keeps busy, an fp32 GEMM waits for its
    descheduled threads on every call (measured: 13-21 ms instead of 0.3 at 16 rows, two threads,
    the other core loaded), so a loaded start-up used to pick ``_int_mm`` for good, ~20x slower
    on an AVX2 machine once the load was gone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probe()
    finally:
        torch.set_num_threads(threads)


def _probe() -> GemmPlan:
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (PROBE_N, PROBE_K), dtype=torch.int8, generator=gen)
    wt, wf = w.t(), float_weight(w)
    timings, float_below, c_through = {}, ALWAYS, 0
    c_built = cpu_fused.available()
    for m in sorted(set(PROBE_ROWS) | (set(C_PROBE_ROWS) if c_built else set())):
        x = torch.randint(-127, 128, (m, PROBE_K), dtype=torch.int8, generator=gen)
        t_int = _best_ms(lambda: torch._int_mm(x, wt))
        xf = x.float()
        t_float = _best_ms(lambda: int_mm_via_float(xf, wf))
        timings[m] = (t_int, t_float)
        if c_built and m in C_PROBE_ROWS and c_through == _previous(C_PROBE_ROWS, m):  # C won at every count below
            t_c = _best_ms(lambda: int_mm_rows_c(xf, w))
            timings[m] = (t_int, t_float, t_c)
            if t_c < min(t_int, t_float):
                c_through = m
        if t_int < t_float and m in PROBE_ROWS:
            float_below = m
            break
    return GemmPlan(float_below, "measured", timings, c_through)


def _previous(rows: tuple[int, ...], m: int) -> int:
    """The probe row count before ``m`` (0 before the first)."""
    i = rows.index(m)
    return rows[i - 1] if i else 0


@functools.cache
def plan() -> GemmPlan:
    """This process's plan: from ``PDSERVE_INT8_GEMM`` (int | float | auto), measured once for auto."""
    mode = os.environ.get("PDSERVE_INT8_GEMM", "auto")
    if mode == "int":
        return GemmPlan(NEVER, "env")
    if mode == "float":
        return GemmPlan(ALWAYS, "env")
    if mode != "auto":
        raise ValueError(f"PDSERVE_INT8_GEMM must be int, float or auto; got {mode!r}")
    return measure()
