"""Input validation for the Triton kernels, run before every launch.

A Triton kernel given a wrong dtype, a short tensor or a block id past the pool reads
or writes arbitrary memory instead of failing, so every wrapper validates here first and
names the offending argument. Shape, dtype and device checks cost nothing; the value
checks (block tables, slots, lengths) read device tensors back to the host, which syncs,
so ``PDSERVE_KERNEL_CHECKS=0`` turns those off for production runs that trust the engine.
"""
from __future__ import annotations

import contextlib
import os

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INTS = (torch.int32, torch.int64)


class KernelInputError(ValueError):
    """Bad input to a kernel, detected before launch."""


_suspended = 0


def value_checks_enabled() -> bool:
    return not _suspended and os.environ.get("PDSERVE_KERNEL_CHECKS", "1") != "0"


@contextlib.contextmanager
def suspended():
    """No value checks inside (a CUDA graph capture cannot sync the host); the engine's own
    indices are what the kernels read there."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise KernelInputError(f"{name}: dtype {t.dtype}, expected one of {', '.join(map(str, allowed))}")


def shape(name: str, t: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """``expected`` may hold None for a free dimension."""
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise KernelInputError(f"{name}: shape {list(t.shape)}, expected {want}")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise KernelInputError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    return first.device


def power_of_two(name: str, value: int, minimum: int = 16) -> None:
    if value < minimum or value & (value - 1):
        raise KernelInputError(f"{name} = {value}: the Triton kernels need a power of two >= {minimum}")


def window(value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise KernelInputError(f"window = {value!r}: expected None or a positive int")


def gemm(xq, x_scale, wq, w_scale, bias, out_dtype) -> None:
    dtype("xq", xq, (torch.int8,))
    dtype("wq", wq, (torch.int8,))
    if xq.dim() != 2:
        raise KernelInputError(f"xq: shape {list(xq.shape)}, expected [M, K]")
    m, k = xq.shape
    shape("wq", wq, (None, k))
    n = wq.shape[0]
    dtype("x_scale", x_scale, (torch.float32,))
    if x_scale.numel() != m or x_scale.dim() not in (1, 2):
        raise KernelInputError(f"x_scale: shape {list(x_scale.shape)}, expected [{m}, 1] (one scale per row of xq)")
    dtype("w_scale", w_scale, (torch.float32,))
    if w_scale.numel() != n or w_scale.dim() not in (1, 2):
        raise KernelInputError(f"w_scale: shape {list(w_scale.shape)}, expected [{n}] (one scale per row of wq)")
    if bias is not None:
        dtype("bias", bias, FLOATS)
        shape("bias", bias, (n,))
    if out_dtype not in FLOATS + (torch.int32,):
        raise KernelInputError(f"out_dtype = {out_dtype}: expected float32, bfloat16, float16 or int32 (raw accumulator)")
    same_device(xq=xq, x_scale=x_scale, wq=wq, w_scale=w_scale, bias=bias)


def pools(k_pool, v_pool, k_scale, v_scale) -> tuple[int, int, int, int]:
    """int8 pools [NB, BS, Hkv, D] and float32 scales [NB, BS, Hkv, 1]; returns (NB, BS, Hkv, D)."""
    dtype("k_pool", k_pool, (torch.int8,))
    if k_pool.dim() != 4:
        raise KernelInputError(f"k_pool: shape {list(k_pool.shape)}, expected [num_blocks, block_size, Hkv, D]")
    nb, bs, hkv, d = k_pool.shape
    dtype("v_pool", v_pool, (torch.int8,))
    shape("v_pool", v_pool, (nb, bs, hkv, d))
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise KernelInputError(f"{name} is None: the Triton kernels read int8 pools with scales")
        dtype(name, s, (torch.float32,))
        shape(name, s, (nb, bs, hkv, 1))
    power_of_two("block_size (k_pool.shape[1])", bs)
    power_of_two("head_dim (k_pool.shape[3])", d)
    return nb, bs, hkv, d


def queries(name: str, q: torch.Tensor, hkv: int, d: int) -> None:
    dtype(name, q, FLOATS)
    shape(name, q, (None, None, d))
    if q.shape[1] % hkv:
        raise KernelInputError(f"{name}: {q.shape[1]} query heads are not a multiple of {hkv} KV heads")


def decode(q, k_pool, v_pool, k_scale, v_scale, block_tables, seq_lens, window_: int | None) -> None:
    nb, bs, hkv, d = pools(k_pool, v_pool, k_scale, v_scale)
    queries("q", q, hkv, d)
    b = q.shape[0]
    dtype("block_tables", block_tables, INTS)
    shape("block_tables", block_tables, (b, None))
    dtype("seq_lens", seq_lens, INTS)
    shape("seq_lens", seq_lens, (b,))
    window(window_)
    same_device(q=q, k_pool=k_pool, v_pool=v_pool, k_scale=k_scale, v_scale=v_scale,
                block_tables=block_tables, seq_lens=seq_lens)
    if value_checks_enabled() and b:
        _lengths("seq_lens", seq_lens, 1, block_tables.shape[1] * bs)
        _tables("block_tables", block_tables, seq_lens, window_, bs, nb)


def prefill(q, k_pool, v_pool, k_scale, v_scale, block_table, start: int, window_: int | None) -> None:
    nb, bs, hkv, d = pools(k_pool, v_pool, k_scale, v_scale)
    queries("q", q, hkv, d)
    dtype("block_table", block_table, INTS)
    shape("block_table", block_table, (None,))
    if not isinstance(start, int) or start < 0:
        raise KernelInputError(f"start = {start!r}: expected a non-negative int")
    end = start + q.shape[0]
    if end > block_table.shape[0] * bs:
        raise KernelInputError(f"block_table: {block_table.shape[0]} blocks of {bs} cannot hold positions up to {end}")
    window(window_)
    same_device(q=q, k_pool=k_pool, v_pool=v_pool, k_scale=k_scale, v_scale=v_scale, block_table=block_table)
    if value_checks_enabled() and q.shape[0]:
        first = 0 if window_ is None else max(0, start - window_ + 1)  # the earliest key any query sees
        lens = torch.tensor([end], device=block_table.device)
        _tables("block_table", block_table[None], lens, end - first, bs, nb)


def write(k_pool, v_pool, k_scale, v_scale, k, v, slots) -> None:
    nb, bs, hkv, d = pools(k_pool, v_pool, k_scale, v_scale)
    dtype("k", k, FLOATS)
    shape("k", k, (None, hkv, d))
    dtype("v", v, FLOATS)
    shape("v", v, tuple(k.shape))
    dtype("slots", slots, INTS)
    shape("slots", slots, (k.shape[0],))
    same_device(k_pool=k_pool, v_pool=v_pool, k_scale=k_scale, v_scale=v_scale, k=k, v=v, slots=slots)
    if value_checks_enabled() and k.shape[0]:
        _lengths("slots", slots, 0, nb * bs - 1)


def _lengths(name: str, t: torch.Tensor, lo: int, hi: int) -> None:
    bad = ((t < lo) | (t > hi)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise KernelInputError(f"{name}[{i}] = {int(t[i])} is outside [{lo}, {hi}]")


def _tables(name: str, tables: torch.Tensor, lens: torch.Tensor, window_: int | None, bs: int, nb: int) -> None:
    """Every block a sequence will read (those overlapping its window) must be a real block id."""
    first = (lens - window_).clamp_min(0) if window_ is not None else torch.zeros_like(lens)
    logical = torch.arange(tables.shape[1], device=tables.device)[None, :]
    needed = (logical >= (first // bs)[:, None]) & (logical <= ((lens - 1) // bs)[:, None])
    bad = (needed & ((tables < 0) | (tables >= nb))).nonzero()
    if len(bad):
        i, j = int(bad[0, 0]), int(bad[0, 1])
        where = f"{name}[{i}, {j}]" if name == "block_tables" else f"{name}[{j}]"
        raise KernelInputError(f"{where} = {int(tables[i, j])} is not a block id in [0, {nb}), "
                               f"and sequence {i} reads that block")
