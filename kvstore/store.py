"""The KV-cache-centric store of one node: index, host and disk tiers, leases, events and stats.

A plain class; ``kvstore.actor`` runs it as the node's Ray actor. Every method takes and
returns plain data (token lists, ``KVExport``, dataclasses), never tensors or handles.
"""
from __future__ import annotations

import itertools
import time

import numpy as np
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvstore.blocks import BlockSpec, join_export, pack, split_export, unpack
from kvstore.index import KVLayout, PrefixIndex
from kvstore.keys import block_keys
from kvstore.leases import Leases
from kvstore.tiers import DiskTier, HostTier
from model.engine.block_pool import KVExport


@dataclass(frozen=True)
class StoreConfig:
    node: str = "node-0"
    host_capacity_blocks: int = 4096
    disk_capacity_blocks: int = 0  # 0 = no disk tier
    disk_dir: str | None = None
    policy: str = "lru"
    lease_ttl_s: float = 30.0
    host_low_watermark: float = 0.9  # once host memory is full, demote to disk down to this fraction

    def __post_init__(self) -> None:
        if self.host_capacity_blocks < 1 or self.disk_capacity_blocks < 0:
            raise ValueError("store capacities: host_capacity_blocks >= 1 and disk_capacity_blocks >= 0")
        if not 0.0 < self.host_low_watermark <= 1.0:
            raise ValueError(f"host_low_watermark must be in (0, 1], got {self.host_low_watermark}")
        if self.disk_capacity_blocks and not self.disk_dir:
            raise ValueError("a disk tier needs disk_dir")


@dataclass
class StoreMatch:
    tokens: int  # prefix tokens whose KV the store can supply
    keys: list[int]
    tiers: list[str]  # where each matched block lives now


@dataclass(frozen=True)
class Event:
    kind: str  # "stored" | "removed"
    key: int
    node: str
    tier: str


@dataclass
class Stats:
    hit_tokens: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    hit_blocks: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    miss_tokens: int = 0
    miss_blocks: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    corrupt_blocks: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    trimmed_bytes: int = 0  # local-group bytes out of the window, not handed to another node
    replicated_blocks: int = 0  # blocks copied in from another node's store (hot-block replication)
    seconds_moving: float = 0.0


class KVStore:
    def __init__(self, spec: BlockSpec, fingerprint: int, layout: KVLayout = KVLayout(),
                 config: StoreConfig = StoreConfig(), use_ray: bool = False):
        self.spec, self.fingerprint, self.config = spec, fingerprint, config
        self.host = HostTier(config.host_capacity_blocks, use_ray)
        self.disk = DiskTier(Path(config.disk_dir), config.disk_capacity_blocks) if config.disk_capacity_blocks else None
        capacity = config.host_capacity_blocks + config.disk_capacity_blocks
        self.index = PrefixIndex(spec.block_size, capacity, config.policy, layout, fingerprint, self._dropped)
        self.leases = Leases(self.index.pin, self.index.unpin)
        self.events: list[Event] = []
        self.stats = Stats()

    # -- the API -----------------------------------------------------------------------------------
    def put(self, tokens: list[int], data: KVExport, fingerprint: int) -> list[int] | None:
        """Cache the KV of ``tokens[:data.end]``; returns the keys newly stored. Validates everything
        before changing anything, so a refused put leaves the store as it was.

        An export that starts past position 0 extends a prefix this store holds already (a decode worker
        publishing the blocks it has filled since its last put, not its whole context again); when the
        store no longer holds all of that prefix (evicted, or the store restarted) nothing is stored and
        the answer is None (the writer may send the whole context): blocks the chain cannot reach would
        never be matched."""
        if fingerprint != self.fingerprint:
            raise ValueError(f"model fingerprint {fingerprint:#x} does not match the store's {self.fingerprint:#x}")
        if len(tokens) < data.end:
            raise ValueError(f"{len(tokens)} tokens for KV of {data.end} positions")
        blocks = split_export(self.spec, data)
        t0 = time.perf_counter()
        self.leases.reclaim_expired()
        prefix = list(tokens[:data.end])
        chain = block_keys(self.fingerprint, prefix, self.spec.block_size, partial=True)
        held = data.start // self.spec.block_size
        if not all(k in self.index for k in chain[:held]):
            return None
        added = set(self.index.insert(prefix, groups=[0] * held + [m for m, _ in blocks]))
        keys = list(itertools.takewhile(lambda k: k in self.index, chain))[held:]  # capacity may cut the chain
        new = []
        for key, (mask, buf) in zip(keys, blocks):
            if key in added:
                self._place(key, mask, buf)
                new.append(key)
            elif mask & ~self._mask(key) and self._mask(key) & ~mask == 0:  # a fuller copy of a cached block
                self._forget_bytes(key)
                self._place(key, mask, buf)
            self.index.entries[key].groups = self._mask(key)
            self.stats.bytes_in += buf.nbytes
        self.stats.seconds_moving += time.perf_counter() - t0
        return new

    def match_many(self, requests: list[list[int]]) -> list[StoreMatch]:
        """One call for a batch of lookups (one actor round trip)."""
        return [self.match(t) for t in requests]

    def match(self, tokens: list[int], count: bool = True) -> StoreMatch:
        """The longest reusable prefix (whole blocks, then the shared part of the next one).
        ``count=False`` leaves the hit/miss counters alone: a writer re-matching what it has just
        put is not a cache hit (the counters count reuse by other requests)."""
        self.leases.reclaim_expired()
        m = self.index.match(list(tokens))
        tiers = [self._tier_of(k) for k in m.keys]
        if not count:
            return StoreMatch(m.tokens, m.keys, tiers)
        for i, tier in enumerate(tiers):
            n = min(self.spec.block_size, m.tokens - i * self.spec.block_size)
            self.stats.hit_tokens[tier] += n
            self.stats.hit_blocks[tier] += 1
        total_blocks = -(-len(tokens) // self.spec.block_size)
        self.stats.miss_tokens += len(tokens) - m.tokens
        self.stats.miss_blocks += total_blocks - len(m.keys)
        return StoreMatch(m.tokens, m.keys, tiers)

    def get(self, keys: list[int], end: int) -> KVExport | None:
        """The KV of a matched prefix of ``end`` tokens over ``keys``; None if a block is gone or
        damaged (a damaged disk block is dropped and reads as a miss, never as data)."""
        t0 = time.perf_counter()
        blocks = []
        for key in keys:
            got = self._read(key)
            if got is None:
                return None
            blocks.append(got)
        out = join_export(self.spec, blocks, end)
        self.stats.bytes_out += sum(b.nbytes for _, b in blocks)
        self.stats.seconds_moving += time.perf_counter() - t0
        return out

    def get_refs(self, keys: list[int], with_digest: bool = False, end: int | None = None) -> list[tuple] | None:
        """Where the blocks are, for a reader to fetch itself: (group mask, Ray object ref) per block
        under Ray (zero-copy on this node, moved by Ray to another), or the arrays without Ray;
        ``with_digest`` adds each block's xxh3_64 checksum for the reader to verify.
        Disk blocks are promoted first; None if any block is gone or damaged.

        ``end`` (a reader on another node, for a prefix of ``end`` tokens): a block holding local-group
        KV that no step after ``end`` can read (older than the window) is handed over without it, as a
        trimmed copy, so only what the window still reads crosses the network (design invariant 3)."""
        out = []
        for i, key in enumerate(keys):
            if key not in self.host and self._read(key) is None:
                return None
            mask, ref, nbytes = self.host.blocks[key]
            digest = self.host.digests.get(key)
            need = mask if end is None else mask & self._needed(i, end)
            if need != mask:
                ref, digest, nbytes = self._trimmed(key, need)
                mask = need
            out.append((mask, ref, digest) if with_digest else (mask, ref))
            self.stats.bytes_out += nbytes
        return out

    def _needed(self, block: int, end: int) -> int:
        """The KV groups a prefix of ``end`` tokens needs from its ``block``-th block."""
        lay, bs = self.index.layout, self.spec.block_size
        need = lay.global_mask
        for mask, window in lay.local:
            if block >= max(0, end - window) // bs:
                need |= mask
        return need

    def _trimmed(self, key: int, need: int) -> tuple[object, int, int]:
        """A copy of a host block with only the groups in ``need``: (ref or array, checksum, bytes)."""
        import xxhash

        mask, buf = self.host.get(key)
        parts = {g: arrs for g, arrs in unpack(self.spec, mask, np.asarray(buf)).items() if need >> g & 1}
        small = pack(self.spec, parts)
        self.stats.trimmed_bytes += buf.nbytes - small.nbytes
        digest = xxhash.xxh3_64_intdigest(small.view(np.uint8))
        if self.host.use_ray:
            import ray

            return ray.put(small), digest, small.nbytes
        return small, digest, small.nbytes

    def tokens_of(self, keys: list[int]) -> list[int] | None:
        """The token ids of a chain of held blocks (a store copying them needs them for its index)."""
        out: list[int] = []
        for k in keys:
            e = self.index.entries.get(k)
            if e is None or e.tokens is None:
                return None
            out.extend(e.tokens)
        return out

    def drop(self, keys: list[int]) -> int:
        """Forget blocks a reader found damaged (and every block chained after them); returns how many
        of ``keys`` were still held. The next request recomputes them."""
        held = [k for k in keys if k in self.index]
        for k in held:
            if k in self.index:
                self.stats.corrupt_blocks += 1
                self._drop_subtree(k)
        return len(held)

    def lease(self, keys: list[int], ttl_s: float | None = None, owner: str = "") -> str:
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise KeyError(f"unknown block keys: {', '.join(f'{k:#x}' for k in missing[:3])}")
        return self.leases.grant(keys, ttl_s or self.config.lease_ttl_s, owner).lease_id

    def release(self, lease_id: str) -> bool:
        return self.leases.release(lease_id)

    def release_owned(self, owner: str) -> int:
        return self.leases.release_owned(owner)

    def drain_events(self) -> list[Event]:
        out, self.events = self.events, []
        return out

    def snapshot(self) -> dict:
        s = asdict(self.stats)
        s.update(node=self.config.node, blocks={"host": len(self.host), "disk": len(self.disk) if self.disk else 0},
                 bytes={"host": self.host.bytes, "disk": self.disk.bytes if self.disk else 0},
                 live_leases=len(self.leases.live), expired_leases=self.leases.expired,
                 gb_per_s=(s["bytes_in"] + s["bytes_out"]) / s["seconds_moving"] / 1e9 if s["seconds_moving"] else 0.0)
        return s

    # -- tiers -----------------------------------------------------------------------------------
    def _place(self, key: int, mask: int, buf) -> None:
        self.host.put(key, mask, buf)
        self.events.append(Event("stored", key, self.config.node, "host"))
        if len(self.host) <= self.host.capacity or self.disk is None:
            return
        low = max(1, int(self.config.host_low_watermark * self.host.capacity))
        for victim in self.host.coldest():  # coldest first; leased blocks stay where they are
            if len(self.host) <= low:
                break
            if victim != key and not self.index.entries[victim].pins:
                self._demote(victim)

    def _demote(self, key: int) -> None:
        mask, buf = self.host.pop(key)
        self.disk.put(key, mask, buf)
        self.stats.demotions += 1
        self.events.append(Event("stored", key, self.config.node, "disk"))
        self.events.append(Event("removed", key, self.config.node, "host"))

    def corrupt(self, key: int) -> bool:
        """Fault injection: flip a byte of a host block, keeping its recorded checksum, so that the
        next reader must notice. False if the block is not in host memory."""
        if key not in self.host:
            return False
        _, buf = self.host.get(key)
        bad = np.array(buf, copy=True)
        bad.reshape(-1).view(np.uint8)[0] ^= 0xFF
        self.host.replace(key, bad)
        return True

    def _read(self, key: int):
        if key in self.host:
            got = self.host.get(key)
            if not self.host.verified(key, got[1]):  # damaged in memory: a miss, never data
                self.stats.corrupt_blocks += 1
                self._drop_subtree(key)
                return None
            return got
        if self.disk is None or key not in self.disk:
            return None
        got = self.disk.get(key)
        if got is None:
            self.stats.corrupt_blocks += 1
            self._drop_subtree(key)
            return None
        self.disk.pop(key)  # promotion: hot again, back to host memory
        self.events.append(Event("removed", key, self.config.node, "disk"))
        self.stats.promotions += 1
        self._place(key, *got)
        return got

    def _drop_subtree(self, key: int) -> None:
        for child in list(self.index.entries[key].children):
            self._drop_subtree(child)
        self.index.remove(key)

    def _dropped(self, key: int) -> None:  # the index let a block go
        self.stats.evictions += 1
        self._forget_bytes(key)

    def _forget_bytes(self, key: int) -> None:
        if key in self.host:
            self.host.pop(key)
            self.events.append(Event("removed", key, self.config.node, "host"))
        if self.disk is not None and key in self.disk:
            self.disk.pop(key)
            self.events.append(Event("removed", key, self.config.node, "disk"))

    def _mask(self, key: int) -> int:
        if key in self.host:
            return self.host.blocks[key][0]
        return self.index.entries[key].groups

    def _tier_of(self, key: int) -> str:
        return "host" if key in self.host else "disk"
