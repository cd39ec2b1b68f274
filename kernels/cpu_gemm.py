"""The routes of an exact int8 GEMM on CPU: the same integers by different kernels, of different speeds.

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
- **oneDNN** (``onednn_int_mm``): the ``_int_mm`` route's other kernel, oneDNN's int8 matmul on a weight
  prepacked once (``_int_mm`` repacks it on every call).

Every route gives the same bits, so batch invariance is untouched; which one runs is
``kernels.gemm_plan``'s choice.
"""
from __future__ import annotations

import functools
import math

import torch

from kernels import cpu_fused  # the C library (the rows path); built on first use

EXACT_K = 1024  # K per float32 chunk: every partial sum stays within 2**24, exact in float32
C_MAX_ROWS = 8
PANEL_COLS = 16  # columns per packed panel (cpu_tile.h's TILE_COLS)


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
