"""Paged attention over int8 KV in Triton: decode (split-K flash-decoding) and prefill.

Both read K/V blocks through block tables and never touch a block wholly outside the
sliding window. int8 codes are widened in registers; K's per-token scale multiplies the
scores and V's the probabilities, so dequantized KV never exists in memory. Softmax is
online (running max and sum, base 2 with log2(e) folded into the score scale).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels import checks

LOG2E = 1.4426950408889634
NEG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp2(NEG - NEG) = 1, never NaN


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: full precision (the default would be TF32 on a GPU); bf16/fp16: tensor cores as they are
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attend_block(q, acc, m, l, k_ptr, v_ptr, ks_ptr, vs_ptr, phys, t, d, allowed, sm_scale,
                  s_p0, s_p1, s_s0, s_s1, IEEE: tl.constexpr):
    """One KV block (BS tokens of one KV head) into the running (acc, m, l) of a tile of query rows."""
    kt = tl.load(k_ptr + phys * s_p0 + t[None, :] * s_p1 + d[:, None])  # [D, BS] int8
    ks = tl.load(ks_ptr + phys * s_s0 + t * s_s1)  # [BS]
    s = _dot(q, kt.to(q.dtype), IEEE) * (ks * sm_scale)[None, :]  # [R, BS], log2 units
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + phys * s_p0 + t[:, None] * s_p1 + d[None, :])  # [BS, D] int8
    vs = tl.load(vs_ptr + phys * s_s0 + t * s_s1)
    acc = acc * alpha[:, None] + _dot((p * vs[None, :]).to(q.dtype), v.to(q.dtype), IEEE)
    return acc, m_new, l


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr,
                   G, WINDOW, BLOCKS_PER_SPLIT, sm_scale,
                   s_qb, s_qh, s_bt0, s_bt1, s_p0, s_p1, s_p2, s_s0, s_s1, s_s2, s_ob, s_oh,
                   HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                   BS: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr):
    """Program (sequence, KV head, split): the G query heads of the KV head over a range of its blocks."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(lens_ptr + b).to(tl.int32)
    first = tl.maximum(n - WINDOW, 0) if HAS_WINDOW else 0
    blk_lo = first // BS + split * BLOCKS_PER_SPLIT
    blk_hi = tl.minimum(blk_lo + BLOCKS_PER_SPLIT, (n - 1) // BS + 1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    t = tl.arange(0, BS)
    heads = kvh * G + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
    m = tl.full((BLOCK_G,), NEG, dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    kh, ksh = k_ptr + kvh * s_p2, ks_ptr + kvh * s_s2
    vh, vsh = v_ptr + kvh * s_p2, vs_ptr + kvh * s_s2
    for blk in range(blk_lo, blk_hi):
        phys = tl.load(bt_ptr + b * s_bt0 + blk * s_bt1).to(tl.int64)
        pos = blk * BS + t
        allowed = ((pos >= first) & (pos < n))[None, :]
        acc, m, l = _attend_block(q, acc, m, l, kh, vh, ksh, vsh, phys, t, d, allowed, sm_scale,
                                  s_p0, s_p1, s_s0, s_s1, IEEE)
    gmask = g < G
    if SPLIT:  # partial results [B, H, S, (D)]; _merge_kernel combines them
        n_split = tl.num_programs(2)
        row = (b * tl.num_programs(1) * G + heads) * n_split + split
        tl.store(po_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])
        tl.store(pm_ptr + row, m, mask=gmask)
        tl.store(pl_ptr + row, l, mask=gmask)
    else:
        out = acc / l[:, None]
        tl.store(o_ptr + b * s_ob + heads[:, None] * s_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gmask[:, None])


@triton.jit
def _merge_kernel(po_ptr, pm_ptr, pl_ptr, o_ptr, H, S, s_ob, s_oh, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Log-sum-exp merge of the splits of one (sequence, head); empty splits carry l = 0 and weigh nothing."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    row = (b * H + h) * S + sp
    smask = sp < S
    m = tl.load(pm_ptr + row, mask=smask, other=NEG)
    l = tl.load(pl_ptr + row, mask=smask, other=0.0)
    acc = tl.load(po_ptr + row[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + b * s_ob + h * s_oh + d, out.to(o_ptr.dtype.element_ty))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(batch: int, hkv: int, span_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU twice over, but at least 4 blocks of work per split."""
    if device.type != "cuda":
        return 1
    programs = 2 * _sm_count(device)
    return max(1, min(triton.cdiv(programs, batch * hkv), triton.cdiv(span_blocks, 4), 64))


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor,
                           v_scale: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           window: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Reference semantics (``kernels.reference.paged_decode_attention``); ``num_splits`` overrides split-K."""
    checks.decode(q, k_pool, v_pool, k_scale, v_scale, block_tables, seq_lens, window)
    b, h, d = q.shape
    _, bs, hkv, _ = k_pool.shape
    _same_layout(k_pool, v_pool, k_scale, v_scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q)
    if b == 0:
        return out
    # blocks a sequence may read: no host sync (the table width bounds every sequence)
    span = block_tables.shape[1] if window is None else min(block_tables.shape[1], triton.cdiv(window, bs) + 1)
    splits = num_splits or _num_splits(b, hkv, span, q.device)
    per_split = triton.cdiv(span, splits)
    splits = triton.cdiv(span, per_split)
    g = h // hkv
    if splits > 1:
        po = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
        pm = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    else:
        po = pm = pl = out
    _decode_kernel[(b, hkv, splits)](
        q, k_pool, v_pool, k_scale, v_scale, block_tables, seq_lens, out, po, pm, pl,
        g, window or 0, per_split, LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), block_tables.stride(0), block_tables.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        out.stride(0), out.stride(1),
        HAS_WINDOW=window is not None, SPLIT=splits > 1, IEEE=q.dtype == torch.float32,
        BS=bs, D=d, BLOCK_G=max(16, triton.next_power_of_2(g)), num_warps=4, num_stages=2)
    if splits > 1:
        _merge_kernel[(b, h)](po, pm, pl, out, h, splits, out.stride(0), out.stride(1),
                              D=d, BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, o_ptr, start, T, G, WINDOW, sm_scale,
                    s_qt, s_qh, s_bt, s_p0, s_p1, s_p2, s_s0, s_s1, s_s2, s_ot, s_oh,
                    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                    BS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (row tile, KV head): rows are (token, query head of this KV head) pairs, flattened,
    so any group size packs whole tiles and each K/V block is loaded once for all of its heads."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < T * G
    tok = tl.minimum(r // G, T - 1)
    heads = kvh * G + r % G
    d = tl.arange(0, D)
    t = tl.arange(0, BS)
    q = tl.load(q_ptr + tok[:, None].to(tl.int64) * s_qt + heads[:, None] * s_qh + d[None, :],
                mask=rmask[:, None], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    q_pos = start + tok
    last = start + tl.minimum((pid * BLOCK_M + BLOCK_M - 1) // G, T - 1)  # the tile's latest query
    first = tl.maximum(start + (pid * BLOCK_M) // G - WINDOW + 1, 0) if HAS_WINDOW else 0
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    m = tl.full((BLOCK_M,), NEG, dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    kh, ksh = k_ptr + kvh * s_p2, ks_ptr + kvh * s_s2
    vh, vsh = v_ptr + kvh * s_p2, vs_ptr + kvh * s_s2
    for blk in range(first // BS, last // BS + 1):
        phys = tl.load(bt_ptr + blk * s_bt).to(tl.int64)
        delta = q_pos[:, None] - (blk * BS + t)[None, :]
        allowed = delta >= 0
        if HAS_WINDOW:
            allowed = allowed & (delta < WINDOW)
        acc, m, l = _attend_block(q, acc, m, l, kh, vh, ksh, vsh, phys, t, d, allowed, sm_scale,
                                  s_p0, s_p1, s_s0, s_s1, IEEE)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + tok[:, None].to(tl.int64) * s_ot + heads[:, None] * s_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor,
                            v_scale: torch.Tensor, block_table: torch.Tensor, start: int,
                            window: int | None = None) -> torch.Tensor:
    """Reference semantics (``kernels.reference.paged_prefill_attention``): the chunk's K/V are in the pool."""
    checks.prefill(q, k_pool, v_pool, k_scale, v_scale, block_table, start, window)
    t, h, d = q.shape
    _, bs, hkv, _ = k_pool.shape
    _same_layout(k_pool, v_pool, k_scale, v_scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q)
    if t == 0:
        return out
    g = h // hkv
    block_m = 64 if q.is_cuda else 16
    _prefill_kernel[(triton.cdiv(t * g, block_m), hkv)](
        q, k_pool, v_pool, k_scale, v_scale, block_table, out, start, t, g, window or 0, LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), block_table.stride(0),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        out.stride(0), out.stride(1),
        HAS_WINDOW=window is not None, IEEE=q.dtype == torch.float32,
        BS=bs, D=d, BLOCK_M=block_m, num_warps=4, num_stages=2)
    return out


def _same_layout(k_pool, v_pool, k_scale, v_scale) -> None:
    """The kernels address K and V (and their scales) with one set of strides."""
    if k_pool.stride() != v_pool.stride() or k_pool.stride(-1) != 1:
        raise checks.KernelInputError(f"k_pool/v_pool strides {k_pool.stride()} / {v_pool.stride()}: "
                                      "need one layout with last stride 1")
    if k_scale.stride() != v_scale.stride():
        raise checks.KernelInputError(f"k_scale/v_scale strides differ: {k_scale.stride()} / {v_scale.stride()}")
