"""Which exact int8 GEMM route (``kernels.cpu_gemm``) runs for how many rows, chosen by measurement.

Every route gives the same bits and batch invariance is untouched; only speed and memory
differ. Which route runs is a per-process plan: ``PDSERVE_INT8_GEMM=int``, ``=float`` or ``=c``
forces one (``c``: rows then panels, where the C library is built); ``auto`` (the default) times
them at start-up (first use, ~0.3-1 s) for a few row counts (at most ``C_MAX_ROWS`` rows over 16 MiB of
weights, as a decode step reads them from memory, not from a cache): the C rows route up to the largest
probed count (<= ``C_MAX_ROWS``) at which it beats all others, then C panels below the smallest
probed count at which they lose, the float route below the smallest count at which ``_int_mm``
wins, ``_int_mm`` from there; never ``_int_mm`` where its sums are not exact (``int_mm_is_exact``). A weight's
float copy or packed copy is made on first use (``WeightForms``), so a process pays only for the routes its
plan takes. ``linear_rows_c`` is the C rows route with the linear's prologue in the same call (decode). From
``PREFILL_PROBE_ROWS`` rows the ``_int_mm`` route may call oneDNN's int8 matmul on a prepacked weight instead
(``onednn_int_mm``: the same sums; ``_int_mm`` repacks the weight on every call), where the probe finds it exact
and faster.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import torch

from kernels import cpu_fused, cpu_gemm
from kernels.cpu_gemm import C_MAX_ROWS, WeightForms

PROBE_ROWS = (1, 16, 128)  # row counts the start-up measurement compares
C_PROBE_ROWS = (1, 4, 8)  # ... and those at which the C rows route may run
PANEL_PROBE_ROWS = (16, 128)  # ... and the C panels route
PREFILL_PROBE_ROWS, ONEDNN_PROBE_SHAPE = 512, (3072, 576)  # where the int route's two kernels are compared
PROBE_K, PROBE_N = 576, 576  # many rows: one weight
STREAM_SHAPE, STREAM_BYTES = (1536, 576), 16 * 2**20  # up to C_MAX_ROWS: int8 weights of this shape, this many bytes
NEVER, ALWAYS = 0, 2**62
ROUTES = ("C rows", "C panels", "float", "int", "oneDNN")  # "oneDNN": the int route's other kernel


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    """Rows (M) up to ``c_through`` take the C rows route, then below ``panels_below`` the C panels, then
    below ``float_below`` the float32 route; the rest ``torch._int_mm``."""

    float_below: int
    source: str  # "env" or "measured"
    timings_ms: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # M -> route -> ms
    c_through: int = 0
    panels_below: int = NEVER
    onednn_from: int = ALWAYS  # rows from which the "int" route calls oneDNN's matmul (prepacked weights), not
    # _int_mm (ALWAYS: no row count reaches it)

    def route(self, rows: int) -> str:
        if rows <= self.c_through:
            return "C rows"
        if rows < self.panels_below:
            return "C panels"
        return "float" if rows < self.float_below else "int"

    def use_float(self, rows: int) -> bool:
        """Whether these rows take float inputs (the integers held in float32): every route but ``_int_mm``."""
        return self.route(rows) != "int"

    def use_c_rows(self, rows: int) -> bool:
        return rows <= self.c_through

    def describe(self) -> str:
        rule = {NEVER: "torch._int_mm always", 1: "torch._int_mm always", ALWAYS: "float32 always"}.get(
            self.float_below, f"float32 below {self.float_below} rows, torch._int_mm from there")
        if self.panels_below != NEVER:
            rule = ("C panels always" if self.panels_below == ALWAYS
                    else f"C panels below {self.panels_below} rows, then {rule}")
        if self.onednn_from != ALWAYS:
            rule = rule.replace("torch._int_mm",
                                f"torch._int_mm (oneDNN's on prepacked weights from {self.onednn_from} rows)")
        if self.c_through:
            rule = f"C on int8 weights up to {self.c_through} rows, then {rule}"
        probes = ", ".join(f"M={m}: " + " / ".join(f"{name} {t:.2f}" for name, t in ts.items()) + " ms"
                           for m, ts in self.timings_ms.items())
        return f"int8 GEMM on CPU: {rule} ({self.source}{'; ' + probes if probes else ''})"


def exact_int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, forms: WeightForms,
                      w_scale: torch.Tensor) -> torch.Tensor:
    """``(xq @ wq.T) * x_scale * w_scale`` [M, N] float32 by the plan's route for M rows: the exact integers
    rounded once to float32, then the two products as ``kernels.reference.int8_matmul`` rounds them (the C
    routes in their epilogue, the others in two torch multiplies). ``xq`` holds the integers in float32
    (``quantize_rows_float``) or int8; ``x_scale`` [M, 1], ``w_scale`` [N]."""
    route = plan().route(xq.shape[0])
    if route == "C rows":
        return cpu_gemm.int_mm_rows_c(xq, forms.wq, x_scale, w_scale)
    if route == "C panels":
        return cpu_gemm.int_mm_panels_c(xq, forms.packed(), forms.wq.shape[0], x_scale, w_scale)
    if route == "int" and xq.shape[0] >= plan().onednn_from:
        acc = cpu_gemm.onednn_int_mm(xq, forms)
    elif route == "int":
        acc = torch._int_mm(xq.to(torch.int8), forms.wq.t())
    else:
        acc = cpu_gemm.int_mm_via_float(xq, forms.as_float())
    if route == "int" and cpu_fused.available():
        return cpu_gemm.int32_scaled_c(acc, x_scale, w_scale)
    out = acc.to(torch.float32)
    return out.mul_(x_scale).mul_(w_scale)


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
    one = [WeightForms(torch.randint(-127, 128, (PROBE_N, PROBE_K), dtype=torch.int8, generator=gen))]
    stream = [WeightForms(torch.randint(-127, 128, STREAM_SHAPE, dtype=torch.int8, generator=gen))
              for _ in range(-(-STREAM_BYTES // (STREAM_SHAPE[0] * STREAM_SHAPE[1])))]
    timings, float_below, c_through, panels_below = {}, ALWAYS, 0, NEVER
    c_built = cpu_fused.available()
    int_exact = int_mm_is_exact(gen)
    panels_win = c_built  # the panels route runs below the first probed count where it loses
    for m in sorted(set(PROBE_ROWS) | (set(C_PROBE_ROWS) | set(PANEL_PROBE_ROWS) if c_built else set())):
        # a few rows (decode) read each weight once per step, from memory: the routes' bytes per weight (1 or 4)
        # count, so they pass over weights larger than the caches; many rows reuse each weight (one, cached)
        forms, reps = (stream, 2) if m <= C_MAX_ROWS else (one, 5)
        x = torch.randint(-127, 128, (m, forms[0].wq.shape[1]), dtype=torch.int8, generator=gen)
        xf = x.float()

        def each(fn):
            return _best_ms(lambda: [fn(f) for f in forms], reps)

        # without fast int8 units _int_mm is ~20x slower than the others, and slower the more rows: once it lost
        # 4x over the weights at one row it is not timed again there (~1 s of start-up on such a machine)
        lost = m <= C_MAX_ROWS and 1 in timings and timings[1]["int"] > 4 * min(timings[1].values())
        hopeless = lost or not int_exact
        t = timings[m] = {"int": math.inf if hopeless else each(lambda f: torch._int_mm(x, f.wq.t())),
                          "float": each(lambda f: cpu_gemm.int_mm_via_float(xf, f.as_float()))}
        if c_built and m in C_PROBE_ROWS and c_through == _previous(C_PROBE_ROWS, m):  # C won at every count below
            t["C rows"] = each(lambda f: cpu_gemm.int_mm_rows_c(xf, f.wq))
            if t["C rows"] < min(t["int"], t["float"]):
                c_through = m
        if panels_win and m in PANEL_PROBE_ROWS:
            t["C panels"] = each(lambda f: cpu_gemm.int_mm_panels_c(xf, f.packed(), PROBE_N))
            panels_win = t["C panels"] < min(t["int"], t["float"])
            panels_below = ALWAYS if panels_win else (NEVER if m == PANEL_PROBE_ROWS[0] else m)
        if t["int"] < t["float"] and m in PROBE_ROWS and float_below == ALWAYS:
            float_below = m
        if float_below != ALWAYS and not panels_win:
            break
    source = "measured" if int_exact else "measured; torch._int_mm's sums are not exact here, so it never runs"
    onednn_from = ALWAYS
    if float_below != ALWAYS and cpu_gemm.onednn_usable() and int_mm_is_exact(gen, "oneDNN"):
        onednn_from = _onednn_from(gen, timings)
    return GemmPlan(float_below, source, timings, c_through, panels_below, onednn_from)


def _onednn_from(gen: torch.Generator, timings: dict[int, dict[str, float]]) -> int:
    """``PREFILL_PROBE_ROWS`` where oneDNN's matmul on prepacked weights beats ``_int_mm`` there (timed over
    SmolLM2's widest weight), else ``ALWAYS`` (never). What separates them is _int_mm packing the weight on every
    call, which counts once rows are many: on the AMX machine (``benchmarks.cpu_paths_ab --gemm-rows``) oneDNN was
    1.2-2.0x faster at 2,048 rows on all four layer weights, 0.6-0.9x at 32, mixed at 128 and 256 (0.8-1.4x, and
    one run 1.4-2.1x at 256); in the engine, oneDNN at every row count made decode at batch 16-32 0.93x, so a
    prefill's rows decide."""
    m, (n, k) = PREFILL_PROBE_ROWS, ONEDNN_PROBE_SHAPE
    forms = WeightForms(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen))
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    t = timings[m] = {"int": _best_ms(lambda: torch._int_mm(x, forms.wq.t()), 3),
                      "oneDNN": _best_ms(lambda: cpu_gemm.onednn_int_mm(x, forms), 3)}
    return m if t["oneDNN"] < t["int"] else ALWAYS


def int_mm_is_exact(gen: torch.Generator, kernel: str = "_int_mm") -> bool:
    """Whether ``torch._int_mm`` (or oneDNN's matmul, ``kernel="oneDNN"``) gives the exact integer sums on this
    machine. oneDNN's int8 kernels for CPUs without VNNI sum byte products in pairs into saturating int16 (inputs
    shifted to unsigned bytes): sums off by up to ~10**5. Seen with ``ONEDNN_MAX_CPU_ISA=AVX2`` on a VNNI machine,
    where torch still hands ``_int_mm`` to oneDNN; a route that breaks the int8 GEMM's exactness must never be
    picked, however fast."""
    x = torch.randint(-127, 128, (17, 576), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (64, 576), dtype=torch.int8, generator=gen)
    x[0], w[0] = 127, -127  # the extremes: 576 products of -16129
    exact = x.double() @ w.double().t()  # integers far below 2**53: exact
    if kernel == "oneDNN":
        return torch.equal(cpu_gemm.onednn_int_mm(x, WeightForms(w)), exact.float())
    return torch.equal(torch._int_mm(x, w.t()), exact.to(torch.int32))


def _previous(rows: tuple[int, ...], m: int) -> int:
    """The probe row count before ``m`` (0 before the first)."""
    i = rows.index(m)
    return rows[i - 1] if i else 0


@functools.cache
def plan() -> GemmPlan:
    """This process's plan: from ``PDSERVE_INT8_GEMM`` (int | float | c | auto), measured once for auto; ``c``
    without the C library built is the float route."""
    mode = os.environ.get("PDSERVE_INT8_GEMM", "auto")
    if mode == "int":
        return GemmPlan(NEVER, "env")
    if mode == "float":
        return GemmPlan(ALWAYS, "env")
    if mode == "c":
        built = cpu_fused.available()
        return GemmPlan(ALWAYS, "env", c_through=C_MAX_ROWS if built else 0, panels_below=ALWAYS if built else NEVER)
    if mode != "auto":
        raise ValueError(f"PDSERVE_INT8_GEMM must be int, float, c or auto; got {mode!r}")
    return measure()
