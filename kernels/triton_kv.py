"""KV write in Triton: quantize new K/V per token and KV head, scatter to the paged pool.

One launch replaces the reference's quantize + four index_put calls (eight kernels and
their temporaries on a GPU): each program reads one token's K and V once and writes
int8 codes and scales straight to its slot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import checks
from kernels.triton_gemm import _quantize


@triton.jit
def _quant_store(src_ptr, dst_ptr, scale_ptr, src_off, dst_off, scale_off, heads, dims, mask):
    x = tl.load(src_ptr + src_off, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, D]
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8), 127.0)  # [BLOCK_H]
    tl.store(dst_ptr + dst_off, _quantize(x, scale[:, None]), mask=mask)
    tl.store(scale_ptr + scale_off, scale, mask=heads < dims)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kp_ptr, vp_ptr, ks_ptr, vs_ptr, slots_ptr, HKV,
                     s_kn, s_kh, s_vn, s_vh,  # new K/V [N, Hkv, D] (last stride 1)
                     s_p0, s_p1, s_p2,  # pools [NB, BS, Hkv, D] (last stride 1)
                     s_s0, s_s1, s_s2,  # scales [NB, BS, Hkv, 1]
                     BS: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    blk, off = slot // BS, slot % BS
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    mask = (h < HKV)[:, None]
    pool_off = blk * s_p0 + off * s_p1 + h[:, None] * s_p2 + d[None, :]
    scale_off = blk * s_s0 + off * s_s1 + h * s_s2
    _quant_store(k_ptr, kp_ptr, ks_ptr, i * s_kn + h[:, None] * s_kh + d[None, :], pool_off, scale_off,
                 h, HKV, mask)
    _quant_store(v_ptr, vp_ptr, vs_ptr, i * s_vn + h[:, None] * s_vh + d[None, :], pool_off, scale_off,
                 h, HKV, mask)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Quantize ``k``, ``v`` [N, Hkv, D] per token and head; write codes and scales at flat ``slots`` [N]."""
    checks.write(k_pool, v_pool, k_scale, v_scale, k, v, slots)
    n, hkv, d = k.shape
    if n == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        if pool.stride() != v_pool.stride() or pool.stride(-1) != 1:
            raise checks.KernelInputError(f"{name}: strides {pool.stride()}; the pools need one layout, last stride 1")
    if k_scale.stride() != v_scale.stride():
        raise checks.KernelInputError(f"k_scale and v_scale differ in layout: {k_scale.stride()} vs {v_scale.stride()}")
    _write_kv_kernel[(n,)](k, v, k_pool, v_pool, k_scale, v_scale, slots, hkv,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
                           k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
                           BS=k_pool.shape[1], D=d, BLOCK_H=triton.next_power_of_2(hkv), num_warps=4)
