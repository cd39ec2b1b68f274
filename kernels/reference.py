"""Torch reference implementations of every kernel: the CPU path and the oracle for Triton.

Scales are float32 and symmetric: ``x ~= q * scale`` with ``q`` in [-127, 127].
"""
from __future__ import annotations

import math

import torch

QMAX = 127.0
DECODE_SLICE_BYTES = 8 * 2**20  # attention temporaries per slice: cache-friendly, below malloc's mmap threshold


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per token, or per output channel) symmetric int8; returns (int8, float32 scale[..., 1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / QMAX
    q = torch.round(xf / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


def int8_matmul(
    xq: torch.Tensor,  # [M, K] int8
    x_scale: torch.Tensor,  # [M, 1] float32
    wq: torch.Tensor,  # [N, K] int8
    w_scale: torch.Tensor,  # [N] float32
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(xq @ wq.T)`` accumulated exactly in int32, then ``* x_scale * w_scale (+ bias)``.

    Integer accumulation makes the result independent of how rows are batched, so a
    batched engine reproduces an unbatched one bit for bit.
    """
    acc = torch._int_mm(xq, wq.t()) if xq.is_cpu or xq.shape[0] > 16 else _int_mm_small(xq, wq)
    out = acc.to(torch.float32) * x_scale * w_scale
    if bias is not None:
        out = out + bias
    return out.to(out_dtype)


def _int_mm_small(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    # torch._int_mm on CUDA wants M > 16; pad rather than change the arithmetic.
    pad = torch.zeros((17 - xq.shape[0], xq.shape[1]), dtype=xq.dtype, device=xq.device)
    return torch._int_mm(torch.cat([xq, pad]), wq.t())[: xq.shape[0]]


def attention(
    q: torch.Tensor,  # [Tq, H, D]
    k: torch.Tensor,  # [Tk, Hkv, D]
    v: torch.Tensor,  # [Tk, Hkv, D]
    q_pos: torch.Tensor,  # [Tq] absolute positions
    k_pos: torch.Tensor,  # [Tk] absolute positions
    window: int | None = None,
) -> torch.Tensor:
    """Causal (and optionally sliding-window) attention of one sequence; returns [Tq, H, D].

    A query at position p sees keys at positions in (p - window, p]. Query heads are
    grouped onto KV heads (MQA/GQA) by a reshape, never by copying K/V. Long prefills go in
    query slices so the score matrix stays small (see ``DECODE_SLICE_BYTES``).
    """
    tq, h, d = q.shape
    rows = max(1, DECODE_SLICE_BYTES // (h * k.shape[0] * 4))
    if tq > rows:
        return torch.cat([attention(q[i:i + rows], k, v, q_pos[i:i + rows], k_pos, window)
                          for i in range(0, tq, rows)])
    hkv = k.shape[1]
    qg = q.reshape(tq, hkv, h // hkv, d).permute(1, 2, 0, 3)  # [Hkv, G, Tq, D]
    kt = k.permute(1, 2, 0).to(q.dtype)  # [Hkv, D, Tk]
    vt = v.permute(1, 0, 2).to(q.dtype)  # [Hkv, Tk, D]
    scores = torch.matmul(qg, kt.unsqueeze(1)) * (1.0 / math.sqrt(d))  # [Hkv, G, Tq, Tk]
    delta = q_pos[:, None] - k_pos[None, :]
    allowed = delta >= 0
    if window is not None:
        allowed &= delta < window
    scores = scores.float().masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, vt.unsqueeze(1))  # [Hkv, G, Tq, D]
    return out.permute(2, 0, 1, 3).reshape(tq, h, d)


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


def _widen(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 -> float; through bf16 (exact for |x| <= 256), which torch's CPU casts do twice as fast."""
    return x.to(torch.bfloat16).to(dtype) if x.dtype == torch.int8 else x.to(dtype)


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
    nblk = int((hi - lo).max()) + 1
    logical = lo[:, None] + torch.arange(nblk, device=q.device)[None, :]  # [B, nblk]
    held = logical <= hi[:, None]
    ids = block_tables.gather(1, torch.minimum(logical, hi[:, None]))
    ids = torch.where(held, ids, ids[:, :1])
    pos = (logical[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(b, -1)  # [B, L]
    valid = (pos >= first[:, None]) & (pos < seq_lens[:, None])
    # [B, nblk, bs, Hkv, D] -> [B, Hkv, L, D], widened and laid out for batched matmuls in one copy
    flat = ids.reshape(-1)

    def take(pool: torch.Tensor) -> torch.Tensor:  # [B, nblk, bs, Hkv, X] -> [B, Hkv, L, X]
        got = pool.index_select(0, flat).view(b, nblk, bs, hkv, -1).permute(0, 3, 1, 2, 4)
        return got.reshape(b, hkv, nblk * bs, got.shape[-1]).contiguous()

    k, v = _widen(take(k_pool), q.dtype), _widen(take(v_pool), q.dtype)
    qg = q.view(b, hkv, h // hkv, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(d))  # [B, Hkv, G, L]
    if k_scale is not None:
        scores = scores * take(k_scale).transpose(-1, -2)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if v_scale is not None:
        probs = probs * take(v_scale).transpose(-1, -2)
    return torch.matmul(probs.to(q.dtype), v).reshape(b, h, d)


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
    k, v = gather_kv(k_pool, v_pool, k_scale, v_scale, key_slots(block_table, k_pos, k_pool.shape[1]), q.dtype)
    q_pos = torch.arange(start, start + t, device=q.device)
    return attention(q, k, v, q_pos, k_pos, window)
