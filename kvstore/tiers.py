"""Where block bytes live: host DRAM (Ray's object store when running under Ray) and disk files.

Both tiers are plain key -> (group mask, bytes) maps with a capacity and a recency order;
which block leaves is the store's decision, not theirs.
"""
from __future__ import annotations

import os
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import xxhash

_HEADER = struct.Struct("<8sQQQQ")  # magic, key, group mask, payload bytes, xxh3_64 of the payload
_MAGIC = b"PDSVKV01"


class HostTier:
    """Blocks in host memory. Under Ray each block is a Ray object owned by the store actor, so it
    outlives the worker that produced it and other processes on the node read it zero-copy."""

    name = "host"

    def __init__(self, capacity_blocks: int, use_ray: bool = False):
        self.capacity = capacity_blocks
        self.use_ray = use_ray
        self.blocks: OrderedDict[int, tuple[int, object, int]] = OrderedDict()  # key -> (mask, value, nbytes)
        self.digests: dict[int, int] = {}  # key -> xxh3_64 of the bytes put: readers verify what they got
        self.bytes = 0

    def __contains__(self, key: int) -> bool:
        return key in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def put(self, key: int, mask: int, buf: np.ndarray) -> None:
        value = buf
        self.digests[key] = xxhash.xxh3_64_intdigest(np.ascontiguousarray(buf).view(np.uint8))
        if self.use_ray:
            import ray

            value = ray.put(buf)
        self.blocks[key] = (mask, value, buf.nbytes)
        self.bytes += buf.nbytes

    def get(self, key: int) -> tuple[int, np.ndarray]:
        mask, value, _ = self.blocks[key]
        self.blocks.move_to_end(key)
        if self.use_ray:
            import ray

            value = ray.get(value)
        return mask, value

    def replace(self, key: int, buf: np.ndarray) -> None:
        """New bytes under a key, keeping its mask and recorded checksum (fault injection only)."""
        mask, _, nbytes = self.blocks[key]
        value = buf
        if self.use_ray:
            import ray

            value = ray.put(buf)
        self.blocks[key] = (mask, value, nbytes)

    def verified(self, key: int, buf: np.ndarray) -> bool:
        """Whether ``buf`` still has the checksum recorded when ``key`` was put."""
        digest = self.digests.get(key)
        return digest is None or xxhash.xxh3_64_intdigest(np.ascontiguousarray(buf).view(np.uint8)) == digest

    def ref(self, key: int):
        """The Ray object ref of a block (for a same-node reader), or the array itself without Ray."""
        return self.blocks[key][1]

    def pop(self, key: int) -> tuple[int, np.ndarray]:
        mask, buf = self.get(key)
        self.bytes -= self.blocks.pop(key)[2]
        self.digests.pop(key, None)
        return mask, buf

    def coldest(self):
        return iter(list(self.blocks))


class DiskTier:
    """One file per block with a checksummed header: a damaged file reads as a miss, never as data."""

    name = "disk"

    def __init__(self, directory: str | Path, capacity_blocks: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity_blocks
        self.blocks: OrderedDict[int, int] = OrderedDict()  # key -> nbytes
        self.bytes = 0

    def __contains__(self, key: int) -> bool:
        return key in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def path(self, key: int) -> Path:
        return self.dir / f"{key:016x}.kv"

    def put(self, key: int, mask: int, buf: np.ndarray) -> None:
        payload = np.ascontiguousarray(buf).tobytes()
        tmp = self.path(key).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, key, mask, len(payload), xxhash.xxh3_64_intdigest(payload)))
            f.write(payload)
        os.replace(tmp, self.path(key))
        self.blocks[key] = len(payload) + _HEADER.size
        self.bytes += self.blocks[key]

    def get(self, key: int) -> tuple[int, np.ndarray] | None:
        """The block, or None when its file is missing or fails its checksum (then it is dropped)."""
        try:
            raw = self.path(key).read_bytes()
            magic, k, mask, n, digest = _HEADER.unpack_from(raw)
            payload = raw[_HEADER.size:]
            ok = magic == _MAGIC and k == key and n == len(payload) and xxhash.xxh3_64_intdigest(payload) == digest
        except (OSError, struct.error):
            ok = False
        if not ok:
            return None
        self.blocks.move_to_end(key)
        return mask, np.frombuffer(payload, dtype=np.uint8).copy()

    def pop(self, key: int) -> None:
        self.bytes -= self.blocks.pop(key)
        self.path(key).unlink(missing_ok=True)
