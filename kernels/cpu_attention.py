"""Exact attention over int8 paged KV as two C calls (``cpu_attention.c``), a prefill as one (its queries in blocks:
``cpu_attention_prefill.c``, on AMX tiles where the CPU has them, ``cpu_attention_amx.c``).

The torch reference (``kernels.reference.paged_decode_attention``) gathers every block a batch
reads, widens it to float32 and runs ~100 ops per layer; at batch 32 the widening copy alone was
a quarter of a decode step. The C loops read keys and values where they lie in the pool and
compute the same exact integer sums, so the bits are the reference's (tests/test_cpu_attention.py
compares them) and batch invariance holds. exp is the reference's ``exp_nonpositive``, op for op in C:
the same bits on every machine, where torch's (MKL's) differ by instruction set.
Built with the fused prologue into one library (``kernels.cpu_fused``; ``PDSERVE_CPU_FUSED=off``
turns both off, ``PDSERVE_CPU_ATTENTION=off`` this one only).
"""
from __future__ import annotations

import ctypes
import math
import os

import torch

from kernels import cpu_fused
from kernels.reference import DECODE_SLICE_BYTES, MAX_KEYS, QMAX, exp_nonpositive, probability_divisor, query_levels

MIN_HEAD_DIM, MAX_HEAD_DIM, MAX_GROUP = 8, 256, 16  # q's grid fits the C loops' int16 halves; their buffers
COLUMN_ALIGN = 16  # score rows padded with -inf to whole vectors
THREADED_MACS = 2**18  # below this much work one thread beats starting another


def usable(q: torch.Tensor, k_pool: torch.Tensor, k_scale: torch.Tensor | None) -> bool:
    """int8 pools, float32 queries on CPU, shapes the C loops take, and the library built."""
    h, d, hkv = q.shape[-2], q.shape[-1], k_pool.shape[-2]
    return (os.environ.get("PDSERVE_CPU_ATTENTION", "auto") != "off" and k_scale is not None and q.is_cpu
            and q.dtype == torch.float32 and k_pool.dtype == torch.int8 and MIN_HEAD_DIM <= d <= MAX_HEAD_DIM
            and h % hkv == 0 and h // hkv <= MAX_GROUP and cpu_fused.available())


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor,
                           v_scale: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           window: int | None = None) -> torch.Tensor:
    """``reference.paged_decode_attention``'s bits; q [B, H, D] at positions seq_lens - 1."""
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0] or seq_lens.shape != (q.shape[0],):
        raise ValueError(f"attention: {q.shape[0]} queries need {q.shape[0]} block tables and lengths; got "
                         f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}")
    qpos = (seq_lens - 1).to(torch.int64)
    return _attend(q, k_pool, v_pool, k_scale, v_scale, block_tables, torch.arange(q.shape[0]), qpos, window)


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor,
                            v_scale: torch.Tensor, block_table: torch.Tensor, start: int,
                            window: int | None = None) -> torch.Tensor:
    """``reference.paged_prefill_attention``'s bits: q [T, H, D] at start..start+T-1: in one call, in blocks of
    queries (``_prefill_blocks``), else one query at a time in slices whose score rows stay small
    (``DECODE_SLICE_BYTES``)."""
    t, h = q.shape[0], q.shape[1]
    out = _prefill_blocks(q, k_pool, v_pool, k_scale, v_scale, block_table, start, window)
    if out is not None:
        return out
    span = start + t if window is None else min(start + t, window)
    rows = max(1, DECODE_SLICE_BYTES // (h * span * 4))
    tables = block_table.reshape(1, -1)
    out = [_attend(q[i:i + rows], k_pool, v_pool, k_scale, v_scale, tables,
                   torch.zeros(min(rows, t - i), dtype=torch.int64), torch.arange(start + i, start + min(i + rows, t)),
                   window)
           for i in range(0, t, rows)]
    return out[0] if len(out) == 1 else torch.cat(out)


def _prefill_blocks(q, k_pool, v_pool, k_scale, v_scale, block_table, start, window) -> torch.Tensor | None:
    """The whole prefill in one C call (``pdserve_attn_prefill``: each block of 16 queries' scores, then at once its
    weighted values, while its score rows are in cache; the keys and values packed once per KV head; on AMX tiles
    where the CPU has them), or None where that call does not take it (fewer than 4 queries, head dims not in whole
    tiles, ``PDSERVE_CPU_ATTENTION_TILES=off``)."""
    lib = cpu_fused.library()
    if not hasattr(lib, "pdserve_attn_prefill"):  # a revision's library (benchmarks.c_kernels_vs)
        return None
    t, h, d = q.shape
    span = start + t if window is None else min(start + t, window)
    if span > MAX_KEYS:
        raise ValueError(f"attention over {span} keys; the exact sums are sized for {MAX_KEYS}")
    for pool in (k_pool, v_pool, k_scale, v_scale):
        if not pool.is_contiguous():
            raise ValueError("the C attention reads contiguous KV pools")
    q, tables = q.contiguous(), block_table.reshape(1, -1).to(torch.int64).contiguous()
    qseq, qpos = torch.zeros(t, dtype=torch.int64), torch.arange(start, start + t)
    out = torch.empty((t, h, d), dtype=torch.float32)
    threads = torch.get_num_threads() if t * span * d >= THREADED_MACS else 1
    with cpu_fused.profiled("pdserve::attention_c"):
        status = lib.pdserve_attn_prefill(q.data_ptr(), t, h, d, qseq.data_ptr(), qpos.data_ptr(), window or 0,
                                          tables.data_ptr(), tables.shape[1], k_pool.shape[1], k_pool.shape[0],
                                          k_pool.data_ptr(), k_scale.data_ptr(), v_pool.data_ptr(), v_scale.data_ptr(),
                                          k_pool.shape[-2], query_levels(d, QMAX), 1.0 / math.sqrt(d),
                                          probability_divisor(QMAX), out.data_ptr(), threads)
    if status == -5:
        return None
    _check(status)
    return out


def _attend(q, k_pool, v_pool, k_scale, v_scale, tables, qseq, qpos, window) -> torch.Tensor:
    """The softmax's numerators (exp of the scores minus each row's max) in C, then probabilities x V in C;
    the rows are packed: each query's hold only the keys it sees (``pdserve_attn_layout``)."""
    n, h, d = q.shape
    hkv = k_pool.shape[-2]
    lib = cpu_fused.library()
    offsets, max_cols = torch.empty(n + 1, dtype=torch.int64), ctypes.c_int64()
    total = lib.pdserve_attn_layout(n, h, qpos.data_ptr(), window or 0, COLUMN_ALIGN, offsets.data_ptr(),
                                    ctypes.byref(max_cols))
    _check(min(total, 0))
    if max_cols.value > MAX_KEYS:
        raise ValueError(f"attention over {max_cols.value} keys; the exact sums are sized for {MAX_KEYS}")
    q = q.contiguous()
    tables = tables.to(torch.int64).contiguous()
    for pool in (k_pool, v_pool, k_scale, v_scale):
        if not pool.is_contiguous():
            raise ValueError("the C attention reads contiguous KV pools")
    threads = torch.get_num_threads() if total * d >= THREADED_MACS else 1
    common = (n, h, d, qseq.data_ptr(), qpos.data_ptr(), window or 0, tables.data_ptr(), tables.shape[1],
              k_pool.shape[1], k_pool.shape[0])
    layout = (offsets.data_ptr(), max_cols.value)
    scores = torch.empty(total, dtype=torch.float32)
    out = torch.empty((n, h, d), dtype=torch.float32)
    with cpu_fused.profiled("pdserve::attention_c"):
        weights = getattr(lib, "pdserve_attn_weights", None) or lib.pdserve_attn_scores  # an older revision's
        _check(weights(q.data_ptr(), *common, k_pool.data_ptr(), k_scale.data_ptr(), hkv,
                       query_levels(d, QMAX), 1.0 / math.sqrt(d), *layout, scores.data_ptr(), threads))
        if not hasattr(lib, "pdserve_attn_weights"):  # benchmarks.c_kernels_vs's base library: the exp in torch
            scores.copy_(exp_nonpositive(scores))
        _check(lib.pdserve_attn_pv(scores.data_ptr(), *common, v_pool.data_ptr(), v_scale.data_ptr(), hkv,
                                   probability_divisor(QMAX), *layout, out.data_ptr(), threads))
    return out


def _check(status: int) -> None:
    if status == -2:
        raise ValueError("attention: a position's block is not in the block table (or not in the pool)")
    if status == -3:
        raise ValueError("attention: a query position is negative")
    if status == -4:
        raise MemoryError("attention: out of memory for the C kernel's per-thread scratch")
    if status:
        raise ValueError(f"attention: the C kernel refused these shapes (status {status})")
