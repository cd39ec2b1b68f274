"""Torch reference implementations of every kernel: the CPU path and the oracle for Triton.

Scales are float32 and symmetric: ``x ~= q * scale`` with ``q`` in [-127, 127].
"""
from __future__ import annotations

import math

import torch

from kernels import cpu_gemm, gemm_plan

QMAX = 127.0
DECODE_SLICE_BYTES = 8 * 2**20  # attention temporaries per slice: cache-friendly, below malloc's mmap threshold
PREFILL_SLICE_ROWS = 128  # query rows per prefill slice: causal slices skip the keys after their last row


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per token, or per output channel) symmetric int8; returns (int8, float32 scale[..., 1])."""
    q, scale = quantize_rows_float(x)
    return q.to(torch.int8), scale


def quantize_rows_float(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows``'s integers held in float32: the float GEMM route's input, without an int8 round trip."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / QMAX
    return torch.round(xf / scale).clamp_(-QMAX, QMAX), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


def int8_matmul(
    xq: torch.Tensor,  # [M, K] int8
    x_scale: torch.Tensor,  # [M, 1] float32
    wq: torch.Tensor,  # [N, K] int8
    w_scale: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    forms: cpu_gemm.WeightForms | None = None,
) -> torch.Tensor:
    """``(xq @ wq.T)`` accumulated exactly in int32, then ``* x_scale * w_scale (+ bias)``.

    Integer accumulation makes the result independent of how rows are batched, so a
    batched engine reproduces an unbatched one bit for bit. With ``forms``
    (``cpu_gemm.WeightForms(wq)``, and ``xq`` its integers in float32) the same integers come from the
    CPU route ``kernels.gemm_plan`` picks for M rows (C on the int8 weight, C on a packed copy,
    float32 GEMMs): the same bits, faster where the CPU's int8 path is slow.
    """
    if forms is not None:
        out = gemm_plan.exact_int8_matmul(xq, x_scale, forms, w_scale)  # the C routes scale in their epilogue
    else:
        acc = torch._int_mm(xq, wq.t()) if xq.is_cpu or xq.shape[0] > 16 else _int_mm_small(xq, wq)
        out = acc.to(torch.float32)  # a fresh tensor (or acc itself, ours): scaled in place, the same bits as
        out.mul_(x_scale).mul_(w_scale)  # acc * x_scale * w_scale without two more [M, N] allocations
    if bias is not None:
        out.add_(bias)
    return out.to(out_dtype)


def _int_mm_small(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    # torch._int_mm on CUDA wants M > 16; pad rather than change the arithmetic.
    pad = torch.zeros((17 - xq.shape[0], xq.shape[1]), dtype=xq.dtype, device=xq.device)
    return torch._int_mm(torch.cat([xq, pad]), wq.t())[: xq.shape[0]]


# -- attention whose every reduction is exact, so a row's result cannot depend on its batch --
# A float matmul or sum rounds in an order that BLAS and torch pick by shape (other kernels for
# 1 row than for 32, other blockings for other lengths), so a sequence's attention would depend
# on its neighbours, its chunking and its padding. Here every sum is of integer-valued floats
# that fit the mantissa: exact in any order, so the same row gives the same bits in any call.
F32_EXACT, F64_EXACT = 2**24, 2**53  # integers below these add exactly in float32 / float64
MAX_KEYS = 2**15  # the longest key span the exact sums are sized for
PV_CHUNK = 256  # keys per float32 partial sum of 8-bit probability slices and int8 V: 256 * 256 * 127 < 2**24
PV_CHUNKED_MIN = 2**18  # V elements from which the chunked float32 sums beat one float64 GEMM
FLOAT_K_LEVELS, FLOAT_V_LEVELS = 2**20, 2**18  # grids of float (not int8) K/V rows: ~1e-6 of the row's largest value
_TINY = 1e-30


# -- exp with the same bits on every machine --------------------------------------------------------------
# torch's CPU exp is MKL's (VML), whose last bits depend on the instruction set MKL dispatches to: AVX-512,
# AVX2 and SSE4.2 machines get different ones (~4% of values differ by an ulp). An int8 model turns one
# ulp into another rounding of an activation, so on SmolLM2 the same prompts gave different greedy
# tokens on an AVX-512 and an AVX2 machine (93.7% vs 95.0% top-1 agreement with fp32 over the same
# 363 positions). This exp is a fixed sequence of float32 operations, each one IEEE rounding (no FMA),
# which the C attention (cpu_attention.h, ``exp_nonpositive``) repeats op for op: the same bits on any
# CPU, in torch or in C. Cephes' expf: n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite),
# a degree-7 polynomial, times 2**n. Within 1.4 ulp of the true exp on [-87, 0].
EXP_LOW = -87.0  # below this exp(x) < 2**-125: taken as 0 (a softmax weight that small never counts)
# float32 values, written exactly (cpu_attention.h holds the same as hex floats)
_LOG2E, _LN2_HI, _LN2_LO = 1.4426950216293335, 0.693359375, -0.00021219444170128554
_EXP_POLY = (0.00019875691214110702, 0.001398199936375022, 0.008333452045917511, 0.04166579619050026,
             0.1666666567325592, 0.5)


def exp_nonpositive(x: torch.Tensor) -> torch.Tensor:
    """exp of float32 ``x <= 0`` (larger x read as 0) with the same bits on every machine: 0 below
    ``EXP_LOW`` and at -inf, NaN at NaN, exactly 1 at 0."""
    x = x.float()
    dead = x < EXP_LOW
    x = x.clamp(EXP_LOW, 0.0)
    n = torch.round(x * _LOG2E)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = torch.full_like(r, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        p = p * r + c
    p = (p * (r * r) + r) + 1.0
    two_n = ((n.to(torch.int32) + 127) << 23).view(torch.float32)  # 2**n, n in [-126, 0]: exact
    return (p * two_n).masked_fill_(dead, 0.0)


def _grid(x: torch.Tensor, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ~= n * scale`` per row (last dim), ``n`` integer-valued in [-levels, levels]; float32 scale [..., 1]."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(_TINY) / levels
    return torch.round(x / scale), scale


def query_levels(d: int, k_max: float) -> float:
    """The integer grid of q in ``_exact_scores``: two float32 slices of ``bits`` each where their
    partial sums stay exact in float32, else the one float64 slice's finer grid."""
    bits = int(math.log2((F32_EXACT - 1) / (d * k_max)))
    return min(F32_EXACT, (F64_EXACT - 1) // (2 * d * k_max)) if bits < 10 else 2.0 ** (2 * bits)


def probability_divisor(v_max: float) -> float:
    """``p_unit = max(p) / probability_divisor(v_max)`` in ``_exact_attention``: n * V sums stay below 2**53."""
    return 2.0 ** min(24, int(math.log2((F64_EXACT - 1) / (v_max * MAX_KEYS))) - 1)


def _exact_scores(q: torch.Tensor, k: torch.Tensor, k_max: float) -> torch.Tensor:
    """``q @ k.T / sqrt(d)`` for integer-valued ``k`` (|k| <= k_max) [..., L, D], float32 [..., R, L].

    q goes on a per-row integer grid split in two slices small enough that every partial sum of
    a slice's products stays below 2**24 (exact in float32); where that leaves too few bits,
    one float64 slice takes the whole grid.
    """
    d = q.shape[-1]
    bits = int(math.log2((F32_EXACT - 1) / (d * k_max)))
    n, scale = _grid(q, query_levels(d, k_max))
    if bits < 10:
        acc = torch.matmul(n.double(), k.double().transpose(-1, -2)).float()
    else:
        hi = torch.round(n * 2.0**-bits)
        both = torch.matmul(torch.cat([hi, n - hi * 2.0**bits], -2), k.float().transpose(-1, -2))
        r = q.shape[-2]
        acc = torch.add(both[..., r:, :], both[..., :r, :], alpha=2.0**bits)  # exact scaling, one rounding
    return acc * (scale * (1.0 / math.sqrt(d)))


def _exact_attention(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, k_max: float,
                     v: torch.Tensor, v_scale: torch.Tensor, v_max: float, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention over integer-valued K/V with per-key scales; float64 [..., R, D].

    q [..., R, D]; k, v [..., L, D] integer-valued (|k| <= k_max, |v| <= v_max); k_scale,
    v_scale [..., 1, L]; allowed [..., R, L] (broadcastable). The max is exact anyway; the
    softmax's sum (float64) and the probability-weighted sum of V (``_exact_pv``) run on
    integer grids. exp is ``exp_nonpositive``: the same bits on every machine.
    """
    if k.shape[-2] > MAX_KEYS:
        raise ValueError(f"attention over {k.shape[-2]} keys; the exact sums are sized for {MAX_KEYS}")
    scores = (_exact_scores(q, k, k_max) * k_scale).masked_fill(~allowed, float("-inf"))
    e = exp_nonpositive(scores - scores.amax(-1, keepdim=True))  # 1 at each row's max, 0 where masked
    z = torch.round(e * 2.0**28).sum(-1, keepdim=True, dtype=torch.float64)  # in units of 2**-28
    p = e * v_scale  # >= 0
    p_unit = p.amax(-1, keepdim=True) / probability_divisor(v_max)
    out = _exact_pv(torch.round(p / p_unit), v, v_max)
    return out * (p_unit.double() * 2.0**28) / z


def _exact_pv(n: torch.Tensor, v: torch.Tensor, v_max: float) -> torch.Tensor:
    """``n @ v`` exactly, float64 [..., R, D], for integers n in [0, 2**24] [..., R, L] and integer-valued v [..., L, D].

    One float64 GEMM in general. For a large int8 V held in float32 whose length is a multiple
    of ``PV_CHUNK`` (decode), n goes in three 8-bit slices and the keys in chunks of PV_CHUNK,
    so every float32 partial sum stays below 2**24: the same exact integers from float32 V, at
    half the bytes of widening V to float64 (decode attention is bound by those bytes; a small
    V is cheaper in one GEMM than in the slicing's extra ops).
    """
    length = v.shape[-2]
    if v_max > QMAX or v.dtype != torch.float32 or length % PV_CHUNK or v.numel() < PV_CHUNKED_MIN:
        return torch.matmul(n.double(), v.double())
    top = torch.floor(n * 2.0**-16)
    mid = torch.floor((n - top * 2.0**16) * 2.0**-8)
    low = n - top * 2.0**16 - mid * 2.0**8
    chunks = length // PV_CHUNK
    slices = torch.cat([top, mid, low], -2).unflatten(-1, (chunks, PV_CHUNK)).movedim(-2, -3)  # [..., C, 3R, PV_CHUNK]
    parts = torch.matmul(slices, v.unflatten(-2, (chunks, PV_CHUNK))).sum(-3, dtype=torch.float64)  # [..., 3R, D]
    r = n.shape[-2]
    return (parts[..., :r, :] * 2.0**16 + parts[..., r:2 * r, :] * 2.0**8) + parts[..., 2 * r:, :]


def _as_grid(x: torch.Tensor, scale: torch.Tensor | None, levels: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """K or V [..., Hkv, D] as integers and per-row scales [..., Hkv, 1]: int8 with its scales, or a float put on a grid."""
    if scale is not None:
        return x, scale, QMAX
    n, s = _grid(x, levels)
    return n, s, levels


def attention(
    q: torch.Tensor,  # [Tq, H, D]
    k: torch.Tensor,  # [Tk, Hkv, D] float, or int8 with k_scale
    v: torch.Tensor,  # [Tk, Hkv, D] float, or int8 with v_scale
    q_pos: torch.Tensor,  # [Tq] absolute positions
    k_pos: torch.Tensor,  # [Tk] absolute positions, ascending
    window: int | None = None,
    k_scale: torch.Tensor | None = None,  # [Tk, Hkv, 1] float32 when k is int8
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (and optionally sliding-window) attention of one sequence; returns [Tq, H, D].

    A query at position p sees keys at positions in (p - window, p]. Query heads are
    grouped onto KV heads (MQA/GQA) by a reshape, never by copying K/V. Each query row's
    result is exact-order (see ``_exact_attention``): the same whichever rows come with it
    and wherever the keys start. Long prefills go in query slices that read only the keys
    their rows can see, so the score matrix stays small (``DECODE_SLICE_BYTES``) and the
    masked-out half of a causal prefill is skipped.
    """
    tq, h, d = q.shape
    rows = max(1, min(PREFILL_SLICE_ROWS, DECODE_SLICE_BYTES // (h * k.shape[0] * 4)))
    if tq > rows:  # causal slices: each reads only the keys its rows can see (exact sums: the bits don't change)
        out = []
        for i in range(0, tq, rows):
            qp = q_pos[i:i + rows]
            lo = int(qp.min()) - window + 1 if window is not None else None
            a = 0 if lo is None else int(torch.searchsorted(k_pos, lo))
            b = int(torch.searchsorted(k_pos, int(qp.max()), right=True))
            scales = [None if x is None else x[a:b] for x in (k_scale, v_scale)]
            out.append(attention(q[i:i + rows], k[a:b], v[a:b], qp, k_pos[a:b], window, *scales))
        return torch.cat(out)
    hkv = k.shape[1]
    kn, ks, k_max = _as_grid(k, k_scale, FLOAT_K_LEVELS)
    vn, vs, v_max = _as_grid(v, v_scale, FLOAT_V_LEVELS)
    qg = q.reshape(tq, hkv, h // hkv, d).permute(1, 2, 0, 3).reshape(hkv, -1, d)  # [Hkv, G*Tq, D]
    delta = q_pos[:, None] - k_pos[None, :]
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    allowed = allowed.repeat(h // hkv, 1)  # rows in (g, t) order, like qg
    out = _exact_attention(qg, kn.permute(1, 0, 2), ks.permute(1, 2, 0), k_max,
                           vn.permute(1, 0, 2), vs.permute(1, 2, 0), v_max, allowed)  # [Hkv, G*Tq, D]
    return out.view(hkv, h // hkv, tq, d).permute(2, 0, 1, 3).reshape(tq, h, d).to(q.dtype)


# -- paged KV: pools of shape [num_blocks, block_size, Hkv, D] (int8) with scales [..., Hkv, 1] --
def write_kv(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
    k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
) -> None:
    """Quantize new K/V [N, Hkv, D] to int8 per token and KV head and scatter them to flat ``slots`` [N].

    Float pools (``k_scale is None``) take K/V as they are: the reference path for fp32 / bf16 runs.
    """
    hkv, d = k.shape[1], k.shape[2]
    if k_scale is None:
        k_pool.view(-1, hkv, d)[slots] = k.to(k_pool.dtype)
        v_pool.view(-1, hkv, d)[slots] = v.to(v_pool.dtype)
        return
    kq, ks = quantize_rows(k)
    vq, vs = quantize_rows(v)
    k_pool.view(-1, hkv, d)[slots] = kq
    v_pool.view(-1, hkv, d)[slots] = vq
    k_scale.view(-1, hkv, 1)[slots] = ks
    v_scale.view(-1, hkv, 1)[slots] = vs


def gather_kv(
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
    slots: torch.Tensor, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K, V at flat ``slots`` (any shape S) -> [*S, Hkv, D]."""
    hkv, d = k_pool.shape[-2], k_pool.shape[-1]
    if k_scale is None:
        return k_pool.view(-1, hkv, d)[slots].to(dtype), v_pool.view(-1, hkv, d)[slots].to(dtype)
    k = k_pool.view(-1, hkv, d)[slots].to(torch.float32) * k_scale.view(-1, hkv, 1)[slots]
    v = v_pool.view(-1, hkv, d)[slots].to(torch.float32) * v_scale.view(-1, hkv, 1)[slots]
    return k.to(dtype), v.to(dtype)


def key_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat pool slots of ``positions`` through a block table ([..., max_blocks], -1 = not held)."""
    blocks = block_table.gather(-1, positions // block_size) if block_table.dim() > 1 else block_table[positions // block_size]
    return blocks * block_size + positions % block_size


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D], one query per sequence, at position seq_lens - 1
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64, -1 where a block is not held
    seq_lens: torch.Tensor,  # [B] tokens in each sequence, the current one included
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention over int8 paged KV; blocks wholly outside the window are never read.

    Whole blocks are gathered; K's scales multiply the scores and V's the probabilities, so
    the int8 tensors are only widened, never rescaled element by element. Large batches go
    in slices whose temporaries stay small (cache-resident, and below malloc's mmap threshold).
    Every sum is exact (``_exact_attention``), so neither the batch, its padding to the longest
    sequence nor the slicing changes a sequence's bits, and a prefill row gets the same ones.
    """
    b, h, d = q.shape
    span = int((seq_lens - (seq_lens - window).clamp_min(0) if window is not None else seq_lens).max())
    per_seq = k_pool.shape[2] * (span + k_pool.shape[1]) * d * 4
    step = max(1, DECODE_SLICE_BYTES // per_seq)
    if b > step:
        return torch.cat([paged_decode_attention(q[i:i + step], k_pool, v_pool, k_scale, v_scale,
                                                 block_tables[i:i + step], seq_lens[i:i + step], window)
                          for i in range(0, b, step)])
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    first = (seq_lens - window).clamp_min(0) if window is not None else torch.zeros_like(seq_lens)
    lo = first // bs
    hi = (seq_lens - 1) // bs
    per_chunk = math.lcm(bs, PV_CHUNK) // bs
    nblk = -(-(int((hi - lo).max()) + 1) // per_chunk) * per_chunk  # whole PV chunks (the extra blocks are masked)
    logical = lo[:, None] + torch.arange(nblk, device=q.device)[None, :]  # [B, nblk]
    held = logical <= hi[:, None]
    ids = block_tables.gather(1, torch.minimum(logical, hi[:, None]))
    ids = torch.where(held, ids, ids[:, :1])
    pos = (logical[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(b, -1)  # [B, L]
    valid = (pos >= first[:, None]) & (pos < seq_lens[:, None])
    # [B, nblk, bs, Hkv, D] -> [B, Hkv, L, D], widened and laid out for batched matmuls in one copy
    flat = ids.reshape(-1)

    def take(pool: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:  # -> [B, Hkv, L, X]
        got = pool.index_select(0, flat).view(b, nblk, bs, hkv, -1).permute(0, 3, 1, 2, 4)
        out = torch.empty(got.shape, dtype=dtype or got.dtype, device=got.device).copy_(got)
        return out.view(b, hkv, nblk * bs, got.shape[-1])

    if k_scale is None:  # float pools: each row on a grid
        (kn, ks), (vn, vs), k_max, v_max = _grid(take(k_pool), FLOAT_K_LEVELS), _grid(take(v_pool), FLOAT_V_LEVELS), \
            FLOAT_K_LEVELS, FLOAT_V_LEVELS
    else:
        kn, vn, ks, vs = take(k_pool, torch.float32), take(v_pool, torch.float32), take(k_scale), take(v_scale)
        k_max = v_max = QMAX
    out = _exact_attention(q.view(b, hkv, h // hkv, d), kn, ks.transpose(-1, -2), k_max,
                           vn, vs.transpose(-1, -2), v_max, valid[:, None, None, :])
    return out.reshape(b, h, d).to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D] queries of one sequence at positions start .. start+T-1
    k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks]
    start: int,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of a prefill chunk over its cached prefix and itself (all in the pool already)."""
    t = q.shape[0]
    first = 0 if window is None else max(0, start - window + 1)
    k_pos = torch.arange(first, start + t, device=q.device)
    slots = key_slots(block_table, k_pos, k_pool.shape[1])
    hkv, d = k_pool.shape[-2], k_pool.shape[-1]
    k, v = k_pool.view(-1, hkv, d)[slots], v_pool.view(-1, hkv, d)[slots]
    scales = (None, None) if k_scale is None else (k_scale.view(-1, hkv, 1)[slots], v_scale.view(-1, hkv, 1)[slots])
    q_pos = torch.arange(start, start + t, device=q.device)
    return attention(q, k, v, q_pos, k_pos, window, *scales)
