"""W8A8 GEMM and per-token activation quantization in Triton.

int8 x int8 tensor-core products accumulate exactly in int32, so the result does not
depend on tiling or batching (the same guarantee ``torch._int_mm`` gives the reference);
the scales are applied once, in the epilogue, where they cost nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import checks

QMAX = 127.0


@triton.jit
def _round_half_even(y):
    """``torch.round``: ties go to the even integer (exact for |y| < 2**22)."""
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _quantize(x, scale):
    """float32 -> int8 codes, bit-identical to the reference (IEEE division, round half to even)."""
    y = _round_half_even(tl.math.div_rn(x, scale))
    return tl.clamp(y, -127.0, 127.0).to(tl.int8)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    """One program per row: amax pass, then a quantize pass (the row is in L2 the second time)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-8), 127.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + k0 + cols, _quantize(x, scale), mask=mask)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of ``x [..., K]``: (int8 [..., K], float32 scale [..., 1]), as the reference."""
    checks.dtype("x", x, checks.FLOATS)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise checks.KernelInputError(f"x: shape {list(x.shape)}, expected [..., K] with K > 0")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    s = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        block = min(triton.next_power_of_2(k), 4096)
        _quant_rows_kernel[(x2.shape[0],)](x2, q, s, k, x2.stride(0), q.stride(0), BLOCK=block,
                                           num_warps=4 if block <= 1024 else 8)
    return q.view(x.shape), s.view(*x.shape[:-1], 1)


@triton.jit
def _walsh_hadamard(y, R: tl.constexpr, LOG2R: tl.constexpr):
    """``R``-point fast Walsh-Hadamard transform of ``y [R]`` in registers, unnormalized, in the order of
    ``model.quant.hadamard_rotate``: the pass pairing j with j + R/2 first, down to j with j + 1, each output
    one IEEE add or subtract (``a + c``, ``a - c``), so the bits are the torch butterflies'."""
    for p in tl.static_range(LOG2R):
        pairs = tl.permute(tl.reshape(y, [1 << p, 2, R >> (p + 1)]), [0, 2, 1])  # [runs, half, (a, c)]
        a, c = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + c, a - c), [0, 2, 1]), [R])
    return y


@triton.jit
def _rotate_quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, norm,
                              R: tl.constexpr, LOG2R: tl.constexpr):
    """One program per row: rotate each R-wide slice, track the amax; then rotate again (cheaper than
    a round trip through memory) and quantize. ``norm`` is R**-0.5 as float32, as torch rounds it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, R)
    amax = tl.zeros([R], dtype=tl.float32)
    for k0 in range(0, K, R):
        x = tl.load(x_ptr + row * stride_x + k0 + cols).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(_walsh_hadamard(x, R, LOG2R) * norm))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-8), 127.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, R):
        x = tl.load(x_ptr + row * stride_x + k0 + cols).to(tl.float32)
        tl.store(q_ptr + row * stride_q + k0 + cols, _quantize(_walsh_hadamard(x, R, LOG2R) * norm, scale))


def rotate_quantize_rows(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(hadamard_rotate(x, block))`` in one launch: the int8 linear's prologue on the GPU,
    where the torch butterflies are ~2 log2(block) passes over the activations (issue 15's GPU profile:
    7 ms of a 30 ms step at batch 128). Rows ``[M, K]``, K a multiple of ``block`` (a power of two)."""
    checks.dtype("x", x, checks.FLOATS)
    if x.dim() != 2 or block < 1 or block & (block - 1) or x.shape[1] % block:
        raise checks.KernelInputError(f"x: shape {list(x.shape)}, expected [M, K] with K a multiple of the "
                                      f"rotation block {block} (a power of two)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _rotate_quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), float(block) ** -0.5,
                                        R=block, LOG2R=block.bit_length() - 1, num_warps=4 if block <= 256 else 8)
    return q, s


@triton.jit
def _w8a8_kernel(x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, o_ptr, M, N, K, K_STEPS,
                 stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, stride_os,
                 HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One output tile over ``K_STEPS`` of the K steps: split ``program_id(1)`` takes steps [s * K_STEPS,
    (s + 1) * K_STEPS) and, when K is split, stores its int32 partial sums at ``o_ptr + s * stride_os``."""
    # grouped launch order: GROUP_M row tiles share the same weight tiles while they are in L2
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * n_n)) // rows_in_group

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # out-of-range rows/columns read row 0 (in bounds) and are never stored
    rm_safe = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_safe = tl.where(rn < N, rn, 0).to(tl.int64)
    first = tl.program_id(1) * K_STEPS
    x_ptrs = x_ptr + rm_safe[:, None] * stride_xm + (first * BLOCK_K + rk[None, :]).to(tl.int64) * stride_xk
    w_ptrs = w_ptr + (first * BLOCK_K + rk[:, None]).to(tl.int64) * stride_wk + rn_safe[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # [BLOCK_K, BLOCK_N] tiles of W^T above
    for k0 in range(first, tl.minimum(first + K_STEPS, tl.cdiv(K, BLOCK_K))):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            left = K - k0 * BLOCK_K
            a = tl.load(x_ptrs, mask=rk[None, :] < left, other=0)
            b = tl.load(w_ptrs, mask=rk[:, None] < left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    o_ptrs = o_ptr + tl.program_id(1).to(tl.int64) * stride_os + rm[:, None].to(tl.int64) * stride_om \
        + rn[None, :] * stride_on
    _epilogue(acc, o_ptrs, (rm[:, None] < M) & (rn[None, :] < N), xs_ptr, ws_ptr, b_ptr, rm_safe, rn_safe,
              HAS_BIAS, SCALED)


@triton.jit
def _epilogue(acc, o_ptrs, o_mask, xs_ptr, ws_ptr, b_ptr, rm_safe, rn_safe, HAS_BIAS: tl.constexpr,
              SCALED: tl.constexpr):
    """The exact int32 sums stored as they are, or scaled once: ``acc * x_scale * w_scale (+ bias)``."""
    if SCALED:
        xs = tl.load(xs_ptr + rm_safe)
        ws = tl.load(ws_ptr + rn_safe)
        out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn_safe).to(tl.float32)[None, :]
        tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs, acc, mask=o_mask)


@triton.jit
def _split_k_sum_kernel(p_ptr, xs_ptr, ws_ptr, b_ptr, o_ptr, M, N, SPLITS, stride_ps, stride_pm, stride_om,
                        HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The split-K partials [SPLITS, M, N] (int32, contiguous rows) added up, then the same epilogue as
    unsplit: integer sums are exact in any order, so the output has the unsplit kernel's bits."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    p_ptrs = p_ptr + rm[:, None].to(tl.int64) * stride_pm + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for s in range(0, SPLITS):
        acc += tl.load(p_ptrs + s * stride_ps, mask=mask, other=0)
    o_ptrs = o_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    _epilogue(acc, o_ptrs, mask, xs_ptr, ws_ptr, b_ptr, tl.where(rm < M, rm, 0), tl.where(rn < N, rn, 0),
              HAS_BIAS, SCALED)


# (M, N, K) -> tiles measured faster (benchmarks.gemm_tiles). ``SPLIT_K`` > 1 splits the K steps across that
# many programs per output tile (int32 partials, then one summing kernel with the epilogue: same bits); the rule
# never splits yet: a 5120-wide layer at decode launches 80 column tiles on 132 SMs, which splitting would fill,
# but no device has timed it (the device session's tile sweep includes split candidates).
TILES: dict[tuple[int, int, int], dict] = {}


def _tiles(m: int, n: int, k: int, device: torch.device) -> dict:
    """Tile sizes by problem shape; small M (decode) gets thin row tiles so more of N runs in parallel."""
    if (m, n, k) in TILES:
        return TILES[(m, n, k)]
    if device.type != "cuda":  # the interpreter: smallest legal tiles run fastest
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    warps = 4 if block_m <= 64 else 8
    if m <= 128:  # decode-sized: weight-bandwidth bound, so 64-wide column tiles (more programs per SM)
        # and 256-deep K steps; the H200 sweep (BENCHMARKS.md, benchmarks/gemm_tiles.py) found this the
        # fastest single choice over the four 13B layers at M = 1, 32 and 128 (a layer's four GEMMs
        # 1.08-1.24x the old rule's in interleaved medians); other M and other models were not swept
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=warps, num_stages=4)
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=warps, num_stages=4)


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(xq @ wq.T) * x_scale * w_scale (+ bias)``; ``out_dtype=torch.int32`` returns the raw accumulator."""
    checks.gemm(xq, x_scale, wq, w_scale, bias, out_dtype)
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    cfg = dict(_tiles(m, n, k, xq.device))
    steps = triton.cdiv(k, cfg["BLOCK_K"])
    splits = max(1, min(cfg.pop("SPLIT_K", 1), steps))
    per_split = triton.cdiv(steps, splits)
    splits = triton.cdiv(steps, per_split)  # no split left without a K step
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), splits)
    xs, ws = x_scale.reshape(m).contiguous(), w_scale.reshape(n).contiguous()
    b = bias if bias is not None else xs
    flags = dict(HAS_BIAS=bias is not None, SCALED=out_dtype != torch.int32)
    dest = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.int32, device=xq.device)
    _w8a8_kernel[grid](xq, wq, xs, ws, b, dest, m, n, k, per_split,
                       xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), dest.stride(-2), dest.stride(-1),
                       dest.stride(0) if splits > 1 else 0, EVEN_K=k % cfg["BLOCK_K"] == 0,
                       **(flags if splits == 1 else dict(HAS_BIAS=False, SCALED=False)), **cfg)
    if splits > 1:
        bm, bn = 16, 64 if xq.device.type == "cuda" else 16
        _split_k_sum_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            dest, xs, ws, b, out, m, n, splits, dest.stride(0), dest.stride(1), out.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, **flags)
    return out
