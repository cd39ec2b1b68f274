"""The ``KVBackend`` of a batched step: K/V written to and read from the block pool through block tables."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from model.engine.block_pool import BlockPool


@dataclass
class Segment:
    tables: list[list[int]]  # per group
    start: int  # position of the first token of this step
    n: int  # tokens of this step


def slot(table: list[int], position: int, block_size: int) -> int:
    """The flat pool slot of ``position`` through a host-side block table (``key_slots`` on ints)."""
    return table[position // block_size] * block_size + position % block_size


class PagedBatch:
    """Flattened tokens of several sequences. One-token segments (decode) share one batched
    attention call per group; longer ones (prefill chunks) attend one sequence at a time."""

    def __init__(self, pool: BlockPool, segments: list[Segment]):
        """Index tensors are built from Python lists, one tensor per group and kind (not one per sequence):
        a decode step of a large batch would otherwise spend more time building them than computing."""
        self.pool = pool
        bs = pool.block_size
        self.segments = segments
        self.positions = torch.tensor([p for s in segments for p in range(s.start, s.start + s.n)], dtype=torch.long)
        offsets = [0]
        for s in segments:
            offsets.append(offsets[-1] + s.n)
        self.offsets = offsets
        n_groups = len(pool.k)
        self.slots = [torch.tensor([slot(s.tables[g], p, bs) for s in segments
                                    for p in range(s.start, s.start + s.n)], dtype=torch.long)
                      for g in range(n_groups)]
        self.decode_idx = [i for i, s in enumerate(segments) if s.n == 1]
        self.prefill_idx = [i for i, s in enumerate(segments) if s.n > 1]
        # per group: segment index -> its block table, for the prefill chunks (attended one at a time)
        self.tables = [{i: torch.tensor(segments[i].tables[g], dtype=torch.long) for i in self.prefill_idx}
                       for g in range(n_groups)]
        if self.decode_idx:
            self.decode_rows = torch.tensor([offsets[i] for i in self.decode_idx])
            self.decode_lens = torch.tensor([segments[i].start + 1 for i in self.decode_idx])
            self.decode_tables = [self._padded([segments[i].tables[g] for i in self.decode_idx])
                                  for g in range(n_groups)]
        if pool.device.type != "cpu":
            self._to_device(pool.device)

    @classmethod
    def for_decode(cls, pool: BlockPool, positions: torch.Tensor, slots: list[torch.Tensor], lens: torch.Tensor,
                   tables: list[torch.Tensor]) -> "PagedBatch":
        """A decode-only batch over index tensors that already live on the pool's device (the static
        buffers a CUDA graph replays): one token per row, at ``positions``, KV written to ``slots``."""
        self = cls.__new__(cls)
        n = positions.shape[0]
        self.pool, self.segments, self.positions, self.slots = pool, [], positions, slots
        self.offsets = list(range(n + 1))
        self.decode_idx, self.prefill_idx, self.tables = list(range(n)), [], [{} for _ in slots]
        self.decode_rows = torch.arange(n, device=positions.device)
        self.decode_lens, self.decode_tables = lens, tables
        return self

    @staticmethod
    def _padded(tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.long)

    def _to_device(self, device: torch.device) -> None:
        """Index tensors are built on the host, then copied once per step (not once per layer)."""
        self.positions = self.positions.to(device)
        self.tables = [{i: t.to(device) for i, t in per_group.items()} for per_group in self.tables]
        self.slots = [s.to(device) for s in self.slots]
        if self.decode_idx:
            self.decode_rows = self.decode_rows.to(device)
            self.decode_lens = self.decode_lens.to(device)
            self.decode_tables = [t.to(device) for t in self.decode_tables]

    def _pool(self, group: int):
        p = self.pool
        return p.k[group], p.v[group], p.k_scale[group], p.v_scale[group]

    def store(self, group: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kernels.write_kv(*self._pool(group), k, v, self.slots[group])

    def attend(self, group: int, q: torch.Tensor, window: int | None) -> torch.Tensor:
        if not self.prefill_idx:
            return kernels.paged_decode_attention(q, *self._pool(group), self.decode_tables[group],
                                                  self.decode_lens, window)
        out = torch.empty_like(q)
        if self.decode_idx:
            out[self.decode_rows] = kernels.paged_decode_attention(
                q[self.decode_rows], *self._pool(group), self.decode_tables[group], self.decode_lens, window)
        for i in self.prefill_idx:
            a, b = self.offsets[i], self.offsets[i + 1]
            out[a:b] = kernels.paged_prefill_attention(q[a:b], *self._pool(group), self.tables[group][i],
                                                        self.segments[i].start, window)
        return out
