"""The prefix index: which blocks are cached, longest-prefix match at token granularity, eviction order.

Entries are blocks keyed by their chained key (``kvstore.keys``), so a key names its whole
prefix. The index is prefix-closed: a block is evicted only after every block extending it,
so walking keys from the start finds every cached prefix. After the longest run of whole
blocks, the next block's tokens are compared directly (invariant 2): a partially matching
block still yields the tokens it shares.

KV groups (invariant 3): each entry records which KV groups it holds. A prefix of n tokens
is usable when every global group holds all its blocks and every local group holds the
blocks covering the last ``window`` tokens; earlier local-group blocks are not needed.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvstore.keys import block_keys


@dataclass(frozen=True)
class KVLayout:
    """KV groups as bits of a mask: global groups, and local groups with their windows."""

    global_mask: int = 1
    local: tuple[tuple[int, int], ...] = ()  # (group mask, window)

    @property
    def all_groups(self) -> int:
        mask = self.global_mask
        for m, _ in self.local:
            mask |= m
        return mask

    @classmethod
    def of(cls, config) -> "KVLayout":
        """From a ``model.config.ModelConfig``: bit i = KV group i."""
        glob = sum(1 << g.index for g in config.kv_groups if g.window is None)
        local = tuple((1 << g.index, g.window) for g in config.kv_groups if g.window is not None)
        return cls(glob, local)


@dataclass
class Entry:
    key: int
    parent: int | None
    depth: int  # index of the block in its sequence
    n_tokens: int  # block_size, or fewer for a partial last block
    tokens: tuple[int, ...] | None  # None for trace blocks (no token data)
    groups: int  # KV groups held
    children: set[int] = field(default_factory=set)
    last_access: int = 0
    hits: int = 0
    pins: int = 0  # leases and in-use references: a pinned block is never evicted
    stamp: int = -1  # identifies this entry's live item in the eviction heap


@dataclass
class Match:
    keys: list[int]  # matched blocks, in order (the last may be partially used)
    tokens: int  # matched tokens: whole blocks plus the shared part of the next one


class PrefixIndex:
    def __init__(self, block_size: int, capacity_blocks: int | None = None, policy: str = "lru",
                 layout: KVLayout = KVLayout(), fingerprint: int = 0,
                 on_remove: Callable[[int], None] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; known: {', '.join(POLICIES)}")
        self.block_size = block_size
        self.capacity = capacity_blocks
        self.policy = policy
        self.layout = layout
        self.fingerprint = fingerprint
        self.on_remove = on_remove  # told of every block that leaves the index (evicted or removed)
        self.entries: dict[int, Entry] = {}
        self._roots: set[int] = set()
        self._clock = itertools.count(1)
        self._heap: list[tuple[float, int, int]] = []  # (priority, stamp, key) of leaves, lazily cleaned
        self._stamp = itertools.count()
        self._aging = 0.0  # GreedyDual-style inflation for the 'lfu' policy
        self.protect = 1000  # 'slru': clock ticks (about two per request) a block that was hit gains

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: int) -> bool:
        return key in self.entries

    # -- match -----------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], touch: bool = True) -> Match:
        keys = block_keys(self.fingerprint, tokens, self.block_size)
        path = self._walk(keys)
        n = len(path) * self.block_size
        best_key, best = None, 0
        rest = tokens[n:n + self.block_size]
        if rest:
            for child in self._children(path[-1] if path else None):
                e = self.entries[child]
                if e.tokens is None:
                    continue
                shared = _common_prefix(e.tokens, rest)
                if shared > best:
                    best_key, best = child, shared
        matched = path + ([best_key] if best_key is not None else [])
        usable = self._usable(matched, n + best)
        if touch:
            self.touch(matched[: -(-usable // self.block_size)] if usable else [])
        return Match(matched[: -(-usable // self.block_size)] if usable else [], usable)

    def match_keys(self, keys: Sequence[int], n_tokens: int, touch: bool = True) -> Match:
        """Match a chain of keys whose tokens are unknown (trace replay): whole blocks only."""
        path = self._walk(keys)
        usable = self._usable(path, min(len(path) * self.block_size, n_tokens))
        used = path[: -(-usable // self.block_size)] if usable else []
        if touch:
            self.touch(used)
        return Match(used, usable)

    def _walk(self, keys: Sequence[int]) -> list[int]:
        path = []
        for k in keys:
            if k not in self.entries:
                break
            path.append(k)
        return path

    def _children(self, parent: int | None):
        return self._roots if parent is None else self.entries[parent].children

    def _usable(self, path: list[int], n: int) -> int:
        """Longest length <= n whose KV every group can supply (globals: all; locals: the window)."""
        lay = self.layout
        while n > 0:
            last = (n - 1) // self.block_size
            ok = all(self.entries[path[i]].groups & lay.global_mask == lay.global_mask for i in range(last + 1))
            for mask, window in lay.local:
                first = max(0, n - window) // self.block_size
                ok = ok and all(self.entries[path[i]].groups & mask for i in range(first, last + 1))
            if ok:
                return n
            n = last * self.block_size  # drop the last block and try again
        return 0

    # -- insert ----------------------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], groups: Sequence[int] | int | None = None) -> list[int]:
        """Index the blocks of ``tokens`` (a partial last block included); returns the keys added.

        ``groups``: the KV-group mask each block holds (one int for all, or one per block).
        """
        keys = block_keys(self.fingerprint, tokens, self.block_size, partial=True)
        bs = self.block_size
        blocks = [tuple(tokens[i * bs:(i + 1) * bs]) for i in range(len(keys))]
        return self._insert_chain(keys, blocks, [len(b) for b in blocks], groups)

    def insert_keys(self, keys: Sequence[int], n_tokens: int) -> list[int]:
        sizes = [min(self.block_size, n_tokens - i * self.block_size) for i in range(len(keys))]
        return self._insert_chain(keys, [None] * len(keys), sizes, None)

    def _insert_chain(self, keys, blocks, sizes, groups) -> list[int]:
        masks = ([self.layout.all_groups] * len(keys) if groups is None else
                 [groups] * len(keys) if isinstance(groups, int) else list(groups))
        added, parent, now = [], None, next(self._clock)
        for depth, (key, block, size, mask) in enumerate(zip(keys, blocks, sizes, masks)):
            e = self.entries.get(key)
            if e is not None:
                e.groups |= mask
                e.last_access = now
                self._push(e)
            else:
                if self.capacity is not None and len(self.entries) >= self.capacity:
                    self.pin(parent) if parent is not None else None
                    try:
                        freed = self.evict(1)
                    finally:
                        self.unpin(parent) if parent is not None else None
                    if not freed:
                        break
                e = Entry(key, parent, depth, size, block, mask, last_access=now)
                self.entries[key] = e
                self._children(parent).add(key)
                added.append(key)
                self._push(e)
            parent = key
        return added

    # -- recency, pins, eviction -----------------------------------------------------------------
    def touch(self, keys: Sequence[int]) -> None:
        now = next(self._clock)
        for k in keys:
            e = self.entries[k]
            e.last_access = now
            e.hits += 1
            self._push(e)

    def pin(self, key: int) -> None:
        self.entries[key].pins += 1

    def unpin(self, key: int) -> None:
        e = self.entries.get(key)
        if e is not None and e.pins > 0:
            e.pins -= 1
            self._push(e)

    def evict(self, n: int) -> list[int]:
        """Remove up to ``n`` unpinned leaves in policy order; returns their keys."""
        out = []
        while len(out) < n and self._heap:
            prio, stamp, key = heapq.heappop(self._heap)
            e = self.entries.get(key)
            if e is None or e.children or e.pins or stamp != e.stamp:
                continue
            if self.policy == "lfu":
                self._aging = prio
            self.remove(key)
            out.append(key)
        return out

    def remove(self, key: int) -> None:
        e = self.entries.pop(key)
        if e.children:
            self.entries[key] = e
            raise ValueError(f"block {key:#x} still has {len(e.children)} cached extensions")
        self._children(e.parent).discard(key)
        if e.parent is not None:
            self._push(self.entries[e.parent])
        if self.on_remove is not None:
            self.on_remove(key)

    def _push(self, e: Entry) -> None:
        if e.children:
            return
        e.stamp = next(self._stamp)
        if self.policy == "lru":
            prio = e.last_access
        elif self.policy == "slru":  # blocks that were hit at least once outlive one-off blocks
            prio = e.last_access + (self.protect if e.hits else 0)
        else:
            prio = self._aging + e.hits + 1
        heapq.heappush(self._heap, (prio, e.stamp, e.key))
        if len(self._heap) > 4 * len(self.entries) + 64:  # drop stale heap items
            self._heap = [(p, s, k) for p, s, k in self._heap
                          if k in self.entries and self.entries[k].stamp == s]
            heapq.heapify(self._heap)


POLICIES = ("lru", "slru", "lfu")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

