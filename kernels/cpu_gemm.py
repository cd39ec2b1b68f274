"""Exact int8 GEMMs on CPU by the fastest route this machine has, chosen by measurement.

``torch._int_mm`` on CPU is as fast as the machine's int8 units: with VNNI or AMX it beats
float32, without them (AVX2 only) it runs ~20x slower than an fp32 GEMM of the same shape,
and even with them it loses to fp32 at a single row. Three other routes give the same integers:

- **float**: a float32 GEMM of int8 values. Every product is exact (|q| <= 128, so |x*w| <= 2**14),
  and as long as no partial sum can pass 2**24 every addition is exact in any order, so the result
  is the integer sum whatever the BLAS kernel, blocking or batch. ``EXACT_K`` is the longest K for
  which that holds (1024 * 128 * 128 = 2**24); longer K goes in chunks whose exact partial results
  add in float64. It holds a float32 copy of each weight, 4x its bytes.
- **C rows** (``int_mm_rows_c``, ``cpu_int8_gemm.c``): up to 8 rows (decode) reading the int8 weight
  itself (byte products summed in pairs by ``vpmaddubsw``, then int32 sums), 2-10x faster than float at those rows on an AVX2 machine.
- **C panels** (``int_mm_panels_c``): many rows (prefill, batched decode) against a packed copy of the
  weight (``pack_weight``, the weight's own bytes), register tiles of 4 rows x 16 columns of 16-bit
  multiply-adds: twice the products per instruction of an fp32 FMA.

So every route gives the same bits and batch invariance is untouched; only speed and memory
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

from kernels import cpu_fused  # the C library (the rows path); built on first use

EXACT_K = 1024  # K per float32 chunk: every partial sum stays within 2**24, exact in float32
PROBE_ROWS = (1, 16, 128)  # row counts the start-up measurement compares
C_PROBE_ROWS = (1, 4, 8)  # ... and those at which the C rows route may run
PANEL_PROBE_ROWS = (16, 128)  # ... and the C panels route
C_MAX_ROWS = 8
PREFILL_PROBE_ROWS, ONEDNN_PROBE_SHAPE = 512, (3072, 576)  # where the int route's two kernels are compared
PANEL_COLS = 16  # columns per packed panel (cpu_tile.h's TILE_COLS)
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


class WeightForms:
    """An int8 weight [N, K] and the copies the CPU routes multiply by, each made on first use: the float
    copy costs 4x the weight's bytes, the packed one 1x, so a process pays only for the routes it takes."""

    def __init__(self, wq: torch.Tensor):
        self.wq = wq.contiguous()
        self._float: torch.Tensor | None = None
        self._packed: torch.Tensor | None = None
        self._onednn: torch.Tensor | None = None

    def as_float(self) -> torch.Tensor:
        if self._float is None:
            self._float = float_weight(self.wq)
        return self._float

    def packed(self) -> torch.Tensor:
        if self._packed is None:
            self._packed = pack_weight(self.wq)
        return self._packed

    def onednn(self) -> torch.Tensor:
        """oneDNN's packed copy (its own blocked layout, 1x the bytes), for ``onednn_int_mm``."""
        if self._onednn is None:
            self._onednn = torch.ops.onednn.qlinear_prepack(self.wq, None)
        return self._onednn


def exact_int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, forms: WeightForms,
                      w_scale: torch.Tensor) -> torch.Tensor:
    """``(xq @ wq.T) * x_scale * w_scale`` [M, N] float32 by the plan's route for M rows: the exact integers
    rounded once to float32, then the two products as ``kernels.reference.int8_matmul`` rounds them (the C
    routes in their epilogue, the others in two torch multiplies). ``xq`` holds the integers in float32
    (``quantize_rows_float``) or int8; ``x_scale`` [M, 1], ``w_scale`` [N]."""
    route = plan().route(xq.shape[0])
    if route == "C rows":
        return int_mm_rows_c(xq, forms.wq, x_scale, w_scale)
    if route == "C panels":
        return int_mm_panels_c(xq, forms.packed(), forms.wq.shape[0], x_scale, w_scale)
    if route == "int" and xq.shape[0] >= plan().onednn_from:
        acc = onednn_int_mm(xq, forms)
    elif route == "int":
        acc = torch._int_mm(xq.to(torch.int8), forms.wq.t())
    else:
        acc = int_mm_via_float(xq, forms.as_float())
    if route == "int" and cpu_fused.available():
        return int32_scaled_c(acc, x_scale, w_scale)
    out = acc.to(torch.float32)
    return out.mul_(x_scale).mul_(w_scale)


def int32_scaled_c(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``acc.float() * x_scale * w_scale`` for int32 sums [M, N] (or float32 ones, each rounded once), rounded as
    those two torch multiplies round it, in one C pass over ``acc``'s own memory (returned as float32; torch took
    three passes and a new tensor)."""
    acc = acc.contiguous()
    m, n = acc.shape
    xs, ws = _scales(x_scale, w_scale, m, n)
    threads = torch.get_num_threads() if m * n >= 2**16 else 1
    lib = cpu_fused.library()
    entry = lib.pdserve_float_scaled if acc.dtype == torch.float32 else lib.pdserve_int32_scaled
    with cpu_fused.profiled("pdserve::int32_scaled_c"):
        status = entry(acc.data_ptr(), m, n, xs.data_ptr(), ws.data_ptr(), acc.data_ptr(), threads)
    _c_status(status, "epilogue", m, n)
    return acc.view(torch.float32)


def onednn_usable() -> bool:
    """Whether torch has oneDNN's int8 matmul with prepacked weights here (``torch.ops.onednn.qlinear_*``: what
    torch's own x86 int8 inference uses), and the C library has the epilogue for its float32 sums."""
    try:
        torch.ops.onednn.qlinear_prepack, torch.ops.onednn.qlinear_pointwise  # noqa: B018 (looked up: present?)
    except (AttributeError, RuntimeError):
        return False
    lib = cpu_fused.library()
    return torch.backends.mkldnn.is_available() and lib is not None and hasattr(lib, "pdserve_float_scaled")


def onednn_int_mm(xq: torch.Tensor, forms: WeightForms) -> torch.Tensor:
    """``xq @ wq.T`` [M, N] for int8 rows (or their integers in float32) by oneDNN's int8 matmul against the weight
    prepacked once (``WeightForms.onednn``): the exact sums, each rounded once to float32 (unit scales, zero zero
    points), as ``torch._int_mm`` then the epilogue's cast give them. torch._int_mm repacks the weight on every
    call: on the AMX machine 1.2-2.0x slower at 2,048 rows (BENCHMARKS.md)."""
    n = forms.wq.shape[0]
    ones, zeros = _unit_scales(n)
    with cpu_fused.profiled("pdserve::onednn_int_mm"):
        return torch.ops.onednn.qlinear_pointwise(xq.to(torch.int8).contiguous(), 1.0, 0, forms.onednn(), ones, zeros,
                                                  None, 1.0, 0, torch.float32, "none", [], "")


@functools.lru_cache(maxsize=64)
def _unit_scales(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int64)


def _scales(x_scale: torch.Tensor | None, w_scale: torch.Tensor | None, m: int, n: int) -> tuple:
    """The scales as the C epilogue reads them: float32 [M] (or [M, 1]) and [N], contiguous; (None, None): none.
    The caller holds them through the call and passes ``_address`` of each."""
    if x_scale is None:
        return None, None
    x_scale, w_scale = x_scale.to(torch.float32).contiguous(), w_scale.to(torch.float32).contiguous()
    if x_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(f"C int8 GEMM: scales of {x_scale.numel()} and {w_scale.numel()} for a {m} x {n} product")
    return x_scale, w_scale


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


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


def int_mm_rows_c(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor | None = None,
                  w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``xq @ wq.T`` [M, N] float32 for up to ``C_MAX_ROWS`` rows of integers in float32 ([M, K]) and the int8
    weight [N, K]: the float path's integers, each rounded once to float32 (as its epilogue does); times
    ``x_scale`` [M, 1] and ``w_scale`` [N] where given, rounded as ``exact_int8_matmul`` says."""
    m, k, n = xq.shape[0], xq.shape[1], wq.shape[0]
    x = xq.to(torch.float32).contiguous()
    wq = wq.contiguous()
    out = torch.empty((m, n), dtype=torch.float32)
    threads = _rows_threads(m, n, k)
    lib = cpu_fused.library()
    with cpu_fused.profiled("pdserve::int8_gemm_c"):
        if x_scale is None:  # the entry point every build has (benchmarks.c_kernels_vs loads older ones)
            status = lib.pdserve_int8_gemm_rows(x.data_ptr(), m, k, wq.data_ptr(), n, out.data_ptr(), threads)
        else:
            xs, ws = _scales(x_scale, w_scale, m, n)
            status = lib.pdserve_int8_gemm_rows_scaled(x.data_ptr(), m, k, wq.data_ptr(), n, _address(xs),
                                                       _address(ws), out.data_ptr(), threads)
    _c_status(status, "rows", m, k)
    return out


def linear_rows_c(x: torch.Tensor, block: int, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``int_mm_rows_c(*rotate_quantize_rows_float(x, block), ...)`` with both scales, in one C call: float32 rows
    [M, K] (M <= ``C_MAX_ROWS``) to [M, N], the same bits as the prologue and the rows GEMM called apart
    (tests/test_cpu_gemm.py). At batch 1 a decode step makes ~120 such calls, and the second crossing from
    Python with its tensors cost more than the prologue's arithmetic."""
    m, k, n = x.shape[0], x.shape[1], wq.shape[0]
    if x.dtype != torch.float32 or k % block or m > C_MAX_ROWS or wq.shape[1] != k:
        raise ValueError(f"C int8 linear (rows): float32 rows [M <= {C_MAX_ROWS}, K] with K a multiple of {block} "
                         f"for a weight of {tuple(wq.shape)}; got {x.dtype} {tuple(x.shape)}")
    x, wq, ws = x.contiguous(), wq.contiguous(), w_scale.to(torch.float32).contiguous()
    out = torch.empty((m, n), dtype=torch.float32)
    with cpu_fused.profiled("pdserve::int8_linear_c"):
        status = m and cpu_fused.library().pdserve_int8_linear_rows(
            x.data_ptr(), m, k, block, block ** -0.5, wq.data_ptr(), n, ws.data_ptr(), out.data_ptr(),
            _rows_threads(m, n, k))
    _c_status(status, "linear rows", m, k)
    return out


THREADED_WEIGHT_BYTES = 2**16  # OpenMP's threads: a few-row GEMM reading this much weight gains from a second


def _rows_threads(m: int, n: int, k: int) -> int:
    """Threads for the C rows GEMM. It is bound by reading the weight (n * k bytes), so with OpenMP's waiting
    threads (a few microseconds to wake) every weight from 64 KiB up splits across them: 1.6-1.9x at one row
    for SmolLM2's layers (BENCHMARKS.md), where the old rule (m * n * k >= 2**22) kept decode at batch 1 on
    one thread. Threads of our own (no OpenMP) cost a start per call, so there only large products split."""
    if cpu_fused.openmp():
        return torch.get_num_threads() if n * k >= THREADED_WEIGHT_BYTES else 1
    return torch.get_num_threads() if m * n * k >= 2**22 else 1


def _c_status(status: int, what: str, m: int, k: int) -> None:
    if status:
        raise ValueError({-1: f"C int8 GEMM ({what}): {m} rows or K={k} out of its range",
                          -4: f"C int8 GEMM ({what}): out of memory",
                          -5: f"C int8 GEMM ({what}): the rows must hold integers in [-127, 127]"}.get(
                              status, f"C int8 GEMM ({what}): status {status}"))


def pack_weight(wq: torch.Tensor) -> torch.Tensor:
    """The int8 weight [N, K] laid out for ``int_mm_panels_c``: [ceil(N / 16), ceil(K / 2), 16, 2], panels of
    16 output columns, each K pair of a column adjacent; zeros pad N to whole panels and K to even."""
    n, k = wq.shape
    kp, np_ = k + k % 2, -(-n // PANEL_COLS) * PANEL_COLS
    padded = torch.zeros((np_, kp), dtype=torch.int8)
    padded[:n, :k] = wq
    return padded.view(np_ // PANEL_COLS, PANEL_COLS, kp // 2, 2).permute(0, 2, 1, 3).contiguous()


def int_mm_panels_c(xq: torch.Tensor, packed: torch.Tensor, n: int, x_scale: torch.Tensor | None = None,
                    w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``xq @ wq.T`` [M, N] float32 for rows of integers in float32 ([M, K]) and ``pack_weight(wq)``: the same
    integers as every other route, each rounded once to float32; times ``x_scale`` [M, 1] and ``w_scale`` [N]
    where given, rounded as ``exact_int8_matmul`` says."""
    m, k = xq.shape
    kp = packed.shape[1] * 2
    if packed.shape[0] * PANEL_COLS < n or kp != k + k % 2:
        raise ValueError(f"C int8 GEMM (panels): a packed weight of {tuple(packed.shape)} for K={k}, N={n}")
    x = xq.to(torch.float32).contiguous()
    out = torch.empty((m, n), dtype=torch.float32)
    threads = torch.get_num_threads() if m * n * k >= 2**22 else 1
    xs, ws = _scales(x_scale, w_scale, m, n)
    with cpu_fused.profiled("pdserve::int8_gemm_panels_c"):
        status = m and cpu_fused.library().pdserve_int8_gemm_packed(x.data_ptr(), m, k, packed.data_ptr(), n, kp,
                                                                    _address(xs), _address(ws), out.data_ptr(),
                                                                    threads)
    _c_status(status, "panels", m, k)
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
                          "float": each(lambda f: int_mm_via_float(xf, f.as_float()))}
        if c_built and m in C_PROBE_ROWS and c_through == _previous(C_PROBE_ROWS, m):  # C won at every count below
            t["C rows"] = each(lambda f: int_mm_rows_c(xf, f.wq))
            if t["C rows"] < min(t["int"], t["float"]):
                c_through = m
        if panels_win and m in PANEL_PROBE_ROWS:
            t["C panels"] = each(lambda f: int_mm_panels_c(xf, f.packed(), PROBE_N))
            panels_win = t["C panels"] < min(t["int"], t["float"])
            panels_below = ALWAYS if panels_win else (NEVER if m == PANEL_PROBE_ROWS[0] else m)
        if t["int"] < t["float"] and m in PROBE_ROWS and float_below == ALWAYS:
            float_below = m
        if float_below != ALWAYS and not panels_win:
            break
    source = "measured" if int_exact else "measured; torch._int_mm's sums are not exact here, so it never runs"
    onednn_from = ALWAYS
    if float_below != ALWAYS and onednn_usable() and int_mm_is_exact(gen, "oneDNN"):
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
                      "oneDNN": _best_ms(lambda: onednn_int_mm(x, forms), 3)}
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
        return torch.equal(onednn_int_mm(x, WeightForms(w)), exact.float())
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
