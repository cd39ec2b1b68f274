"""One cached block as bytes: the int8 K/V and scales of the KV groups it holds, in one flat buffer.

A flat numpy buffer is what Ray's object store shares zero-copy on one node and what the
disk tier writes with a checksum. ``BlockSpec`` fixes the layout, so a buffer of the wrong
size, dtype or shape is refused at the door.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.engine.block_pool import GroupBlocks, KVExport


@dataclass(frozen=True)
class BlockSpec:
    block_size: int
    n_kv_heads: int
    head_dim: int
    n_groups: int

    @classmethod
    def of(cls, config) -> "BlockSpec":
        return cls(config.block_size, config.n_kv_heads, config.head_dim, len(config.kv_groups))

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.n_kv_heads, self.head_dim)

    @property
    def scale_shape(self) -> tuple[int, int, int]:
        return (self.block_size, self.n_kv_heads, 1)

    @property
    def group_bytes(self) -> int:
        n = self.block_size * self.n_kv_heads
        return 2 * n * self.head_dim + 2 * n * 4

    def nbytes(self, mask: int) -> int:
        return bin(mask).count("1") * self.group_bytes


def pack(spec: BlockSpec, parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """{group: (k, v, k_scale, v_scale)} of one block -> flat uint8 buffer (groups in index order)."""
    chunks = []
    for g in sorted(parts):
        k, v, ks, vs = parts[g]
        for arr, shape, dtype in ((k, spec.kv_shape, np.int8), (v, spec.kv_shape, np.int8),
                                  (ks, spec.scale_shape, np.float32), (vs, spec.scale_shape, np.float32)):
            if arr is None or arr.dtype != dtype or tuple(arr.shape) != shape:
                got = None if arr is None else f"{arr.dtype} {tuple(arr.shape)}"
                raise ValueError(f"KV group {g}: expected {np.dtype(dtype).name} {shape} per block, got {got}")
            chunks.append(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)


def unpack(spec: BlockSpec, mask: int, buf: np.ndarray) -> dict[int, tuple[np.ndarray, ...]]:
    if buf.nbytes != spec.nbytes(mask):
        raise ValueError(f"block buffer of {buf.nbytes} bytes for groups {mask:#b} ({spec.nbytes(mask)} expected)")
    out, at = {}, 0
    kv_n = int(np.prod(spec.kv_shape))
    sc_n = int(np.prod(spec.scale_shape)) * 4
    for g in range(spec.n_groups):
        if not mask >> g & 1:
            continue
        k = buf[at:at + kv_n].view(np.int8).reshape(spec.kv_shape); at += kv_n
        v = buf[at:at + kv_n].view(np.int8).reshape(spec.kv_shape); at += kv_n
        ks = buf[at:at + sc_n].view(np.float32).reshape(spec.scale_shape); at += sc_n
        vs = buf[at:at + sc_n].view(np.float32).reshape(spec.scale_shape); at += sc_n
        out[g] = (k, v, ks, vs)
    return out


def split_export(spec: BlockSpec, data: KVExport) -> list[tuple[int, np.ndarray]]:
    """An engine export of positions [start, end) -> one (group mask, buffer) per block from ``start``'s
    (a block boundary) to the end."""
    if data.block_size != spec.block_size:
        raise ValueError(f"block size {data.block_size} does not match the store's {spec.block_size}")
    if data.start % spec.block_size:
        raise ValueError(f"an export to store must start on a block boundary, not at position {data.start}")
    if len(data.groups) != spec.n_groups:
        raise ValueError(f"export has {len(data.groups)} KV groups, the store's model {spec.n_groups}")
    first, n_blocks = data.start // spec.block_size, -(-data.end // spec.block_size)
    per_block: list[dict] = [{} for _ in range(first, n_blocks)]
    for g, gb in enumerate(data.groups):
        if gb.k_scale is None:
            raise ValueError(f"KV group {g} is not int8: the store holds int8 K/V with float32 scales")
        for j in range(len(gb.k)):
            i = gb.first_block + j
            if not first <= i < n_blocks:
                raise ValueError(f"KV group {g} has blocks outside the export's positions "
                                 f"[{data.start}, {data.end})")
            per_block[i - first][g] = (gb.k[j], gb.v[j], gb.k_scale[j], gb.v_scale[j])
    return [(sum(1 << g for g in parts), pack(spec, parts)) for parts in per_block]


def join_export(spec: BlockSpec, blocks: list[tuple[int, np.ndarray]], end: int) -> KVExport:
    """The inverse of ``split_export`` for a prefix of ``end`` tokens: per group, its run of held blocks.

    Each byte is copied once, from the (possibly shared, read-only) block buffers into the result;
    when every block holds the same groups (the common case) that is one stacking copy, and the
    per-group arrays are strided views into it.
    """
    out = KVExport(spec.block_size, 0, end)
    masks = {mask for mask, _ in blocks}
    if len(masks) == 1 and blocks:
        return _join_uniform(spec, masks.pop(), [buf for _, buf in blocks], out)
    unpacked = [unpack(spec, mask, buf) for mask, buf in blocks]
    for g in range(spec.n_groups):
        held = [i for i, parts in enumerate(unpacked) if g in parts]
        first = len(blocks)
        while first > 0 and first - 1 in held:  # the run that ends the prefix; a local group's older
            first -= 1                          # blocks (before a gap) are out of its window
        if held and held[-1] != len(blocks) - 1:
            raise ValueError(f"KV group {g} has a hole in its blocks")
        held = held[held.index(first):] if first < len(blocks) else []
        n = len(blocks) - first
        arrays = [np.empty((n, *spec.kv_shape), np.int8), np.empty((n, *spec.kv_shape), np.int8),
                  np.empty((n, *spec.scale_shape), np.float32), np.empty((n, *spec.scale_shape), np.float32)]
        for j, i in enumerate(held):
            for dst, src in zip(arrays, unpacked[i][g]):
                dst[j] = src
        out.groups.append(GroupBlocks(first, *arrays))
    return out


def _join_uniform(spec: BlockSpec, mask: int, bufs: list[np.ndarray], out: KVExport) -> KVExport:
    if any(b.nbytes != spec.nbytes(mask) for b in bufs):
        raise ValueError(f"block buffers of the wrong size for groups {mask:#b}")
    table = np.stack(bufs)  # [n_blocks, bytes per block]: the one copy
    n = len(bufs)
    kv_n = int(np.prod(spec.kv_shape))
    sc_n = int(np.prod(spec.scale_shape)) * 4
    at = 0
    for g in range(spec.n_groups):
        if not mask >> g & 1:
            out.groups.append(GroupBlocks(n, *_empty(spec)))
            continue
        arrays = []
        for size, dtype, shape in ((kv_n, np.int8, spec.kv_shape), (kv_n, np.int8, spec.kv_shape),
                                   (sc_n, np.float32, spec.scale_shape), (sc_n, np.float32, spec.scale_shape)):
            arrays.append(table[:, at:at + size].view(dtype).reshape(n, *shape))
            at += size
        out.groups.append(GroupBlocks(0, *arrays))
    return out


def _empty(spec: BlockSpec) -> list[np.ndarray]:
    return [np.zeros((0, *spec.kv_shape), np.int8), np.zeros((0, *spec.kv_shape), np.int8),
            np.zeros((0, *spec.scale_shape), np.float32), np.zeros((0, *spec.scale_shape), np.float32)]
