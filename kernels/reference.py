"""Torch reference implementations of every kernel: the CPU path and the oracle for Triton.

Scales are float32 and symmetric: ``x ~= q * scale`` with ``q`` in [-127, 127].
"""
from __future__ import annotations

import math

import torch

QMAX = 127.0


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
    grouped onto KV heads (MQA/GQA) by a reshape, never by copying K/V.
    """
    tq, h, d = q.shape
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
