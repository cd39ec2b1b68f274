"""KV storage that the transformer writes into and attends over, passed in by the caller.

The model never owns its cache: it asks a ``KVBackend`` to store a KV group's new K/V
and to attend over that group. ``ContiguousKVCache`` serves one sequence from flat
per-group tensors; the paged engine supplies a backend that reads through block tables.
"""
from __future__ import annotations

from typing import Protocol

import torch

import kernels
from model.config import ModelConfig
from model.quant import compute_dtype


class KVBackend(Protocol):
    positions: torch.Tensor  # [N] absolute position of each token in this forward

    def store(self, group: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep K/V ([N, Hkv, D], after RoPE) of this forward's tokens for ``group``."""

    def attend(self, group: int, q: torch.Tensor, window: int | None) -> torch.Tensor:
        """Attention of this forward's queries [N, H, D] over ``group``'s K/V; returns [N, H, D]."""


class ContiguousKVCache:
    """One sequence, one flat buffer per KV group, int8 + per-token scales when the config says so.

    Every group keeps all positions (local groups included): simple and exact; freeing
    what has left the window is the paged engine's job.
    """

    def __init__(self, config: ModelConfig, max_len: int | None = None, device: str | torch.device = "cpu"):
        self.config = config
        self.max_len = max_len or config.max_seq_len
        self.int8 = config.quant.kv
        dtype = torch.int8 if self.int8 else compute_dtype(config.quant)
        shape = (len(config.kv_groups), self.max_len, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        if self.int8:
            self.k_scale = torch.zeros(shape[:-1] + (1,), dtype=torch.float32, device=device)
            self.v_scale = torch.zeros_like(self.k_scale)
        self.length = 0
        self.positions = torch.zeros(0, dtype=torch.long, device=device)

    def extend(self, n: int) -> "ContiguousKVCache":
        """Reserve the next ``n`` positions for the forward about to run."""
        if self.length + n > self.max_len:
            raise ValueError(f"sequence of {self.length + n} tokens exceeds the cache's {self.max_len}")
        self.positions = torch.arange(self.length, self.length + n, device=self.k.device)
        self.length += n
        return self

    def store(self, group: int, k: torch.Tensor, v: torch.Tensor) -> None:
        start, end = self.length - k.shape[0], self.length
        if self.int8:
            (self.k[group, start:end], self.k_scale[group, start:end]) = kernels.quantize_rows(k)
            (self.v[group, start:end], self.v_scale[group, start:end]) = kernels.quantize_rows(v)
        else:
            self.k[group, start:end] = k
            self.v[group, start:end] = v

    def attend(self, group: int, q: torch.Tensor, window: int | None) -> torch.Tensor:
        """int8 K/V go to the kernel as they are held, with their scales: the paged engine's arithmetic, bit for bit."""
        first = 0 if window is None else max(0, int(self.positions[0]) - window + 1)
        span = slice(first, self.length)
        scales = dict(k_scale=self.k_scale[group, span], v_scale=self.v_scale[group, span]) if self.int8 else {}
        return kernels.attention(q, self.k[group, span], self.v[group, span], self.positions,
                                 torch.arange(first, self.length, device=q.device), window, **scales)
