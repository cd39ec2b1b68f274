"""Paged KV memory: one pool of fixed-size blocks per KV group, reference-counted.

A block holds ``block_size`` consecutive positions of one sequence's K/V for one group
(int8 + a float32 scale per token and KV head, or plain floats on the reference path).
Blocks are shared by reference count (prefix reuse) and copied before a shared block is
written (copy-on-write of a partially matched tail block).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from model.config import ModelConfig
from model.quant import compute_dtype


@dataclass
class Prefix:
    """KV of the first ``length`` tokens already in the pool: per group, logical block -> block id (-1 = absent).

    A Prefix owns one reference on each of its blocks until ``Engine.release_prefix``.
    """

    length: int
    tables: list[list[int]]


@dataclass
class GroupBlocks:
    first_block: int  # logical index of the first block held (local groups skip what left the window)
    k: np.ndarray  # [n, block_size, Hkv, D] int8 (or float)
    v: np.ndarray
    k_scale: np.ndarray | None  # [n, block_size, Hkv, 1] float32
    v_scale: np.ndarray | None


@dataclass
class KVExport:
    """The KV of positions [start, end) of one sequence, per KV group: what the store ships."""

    block_size: int
    start: int
    end: int
    groups: list[GroupBlocks] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for g in self.groups for a in (g.k, g.v, g.k_scale, g.v_scale) if a is not None)


class BlockPool:
    def __init__(self, config: ModelConfig, blocks_per_group: list[int], device: str | torch.device = "cpu"):
        self.config = config
        self.block_size = config.block_size
        self.device = torch.device(device)
        self.int8 = config.quant.kv
        dtype = torch.int8 if self.int8 else compute_dtype(config.quant)
        shape = (self.block_size, config.n_kv_heads, config.head_dim)
        self.k = [torch.zeros((n, *shape), dtype=dtype, device=device) for n in blocks_per_group]
        self.v = [torch.zeros_like(t) for t in self.k]
        scale_shape = (self.block_size, config.n_kv_heads, 1)
        self.k_scale = [torch.zeros((n, *scale_shape), device=device) if self.int8 else None for n in blocks_per_group]
        self.v_scale = [torch.zeros_like(t) if t is not None else None for t in self.k_scale]
        self.capacity = list(blocks_per_group)
        self.refs = [[0] * n for n in blocks_per_group]  # lists: the scheduler reads them per step, per group
        self._free = [deque(range(n)) for n in blocks_per_group]

    # -- accounting ----------------------------------------------------------------------------
    def num_free(self, group: int) -> int:
        return len(self._free[group])

    def free_counts(self) -> list[int]:
        return [len(f) for f in self._free]

    def allocate(self, group: int) -> int:
        if not self._free[group]:
            raise MemoryError(f"KV group {group}: no free block")
        block = self._free[group].popleft()
        self.refs[group][block] = 1
        return block

    def incref(self, group: int, block: int) -> None:
        if self.refs[group][block] <= 0:
            raise ValueError(f"KV group {group}: block {block} is not allocated")
        self.refs[group][block] += 1

    def decref(self, group: int, block: int) -> None:
        if self.refs[group][block] <= 0:
            raise ValueError(f"KV group {group}: block {block} released more often than held")
        self.refs[group][block] -= 1
        if self.refs[group][block] == 0:
            self._free[group].append(block)

    def shared(self, group: int, block: int) -> bool:
        return self.refs[group][block] > 1

    def copy_block(self, group: int, src: int, dst: int) -> None:
        for pool in (self.k, self.v, self.k_scale, self.v_scale):
            if pool[group] is not None:
                pool[group][dst].copy_(pool[group][src])

    # -- bytes in and out ----------------------------------------------------------------------
    def read(self, group: int, blocks: list[int], first_block: int) -> GroupBlocks:
        """Host copies of ``blocks`` (what the store ships), wherever the pool lives."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)

        def take(pool):
            return None if pool[group] is None else pool[group][idx].cpu().numpy()

        return GroupBlocks(first_block, take(self.k), take(self.v), take(self.k_scale), take(self.v_scale))

    def write(self, group: int, blocks: list[int], data: GroupBlocks) -> None:
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for pool, arr in ((self.k, data.k), (self.v, data.v), (self.k_scale, data.k_scale), (self.v_scale, data.v_scale)):
            if (pool[group] is None) != (arr is None):
                raise ValueError("KV blocks of another KV dtype (int8 vs float) cannot be imported")
            if arr is not None:
                if tuple(arr.shape[1:]) != tuple(pool[group].shape[1:]):
                    raise ValueError(f"KV blocks of shape {arr.shape[1:]} for a pool of {tuple(pool[group].shape[1:])}")
                pool[group][idx] = torch.from_numpy(np.ascontiguousarray(arr)).to(pool[group].device, pool[group].dtype)


def blocks_per_group(config: ModelConfig, kv_cache_bytes: int, max_seqs: int, chunk_tokens: int) -> list[int]:
    """Split a byte budget into blocks per group. A local group never needs more than ``max_seqs``
    windows' worth plus one prefill chunk (it frees what leaves its window); what it does not need
    goes to the groups that can use it, in equal shares (water-filling), so that a shared-KV model's
    few global groups get the memory its many local groups leave."""
    per_block = config.block_size * config.kv_bytes_per_token_per_group
    caps = [None if g.window is None else
            max_seqs * (g.window // config.block_size + 2) + chunk_tokens // config.block_size + 1
            for g in config.kv_groups]
    counts = [0] * len(caps)
    left, open_ = kv_cache_bytes // per_block, set(range(len(caps)))
    while open_:
        share = left // len(open_)
        capped = [i for i in open_ if caps[i] is not None and caps[i] <= share]
        if not capped:
            for i in open_:
                counts[i] = share
            break
        for i in capped:
            counts[i] = caps[i]
            left -= caps[i]
            open_.remove(i)
    return [max(1, c) for c in counts]
