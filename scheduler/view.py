"""What the Conductor knows about the cluster: per-instance prefill queues, decode batches, and which
KV blocks each instance holds.

Block holdings use the real prefix index (``kvstore.index.PrefixIndex``, one per instance, with
its capacity and eviction order) and the chained block keys of ``kvstore.keys`` (never Python's
``hash()``). A ``BlockLocator`` maps each key to the instances holding it, so the longest cached
prefix on every instance comes from one walk over the request's keys (the "global metadata" of
Mooncake), which keeps a decision well under a millisecond with 64 instances.

Where caches live: a cache belongs to a *holder*. In the simulator (and a one-node cluster) each
prefill instance is its own holder, as in Mooncake's paper. On a cluster of several Ray nodes,
``nodes`` maps each worker to its node, and the holder is the node's store: the prefill workers of
one node share one index, a decode-only node's store is a holder too, and a policy sees both the
prefix a worker's own node holds (``prefix_tokens``) and the longest one any node holds
(``best_holder``), which it may fetch across nodes instead of recomputing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.index import PrefixIndex
from kvstore.keys import block_keys


class BlockLocator:
    """key -> names of the instances that hold the block."""

    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = {}

    def add(self, key: int, name: str) -> None:
        self.holders.setdefault(key, set()).add(name)

    def discard(self, key: int, name: str) -> None:
        s = self.holders.get(key)
        if s is not None:
            s.discard(name)
            if not s:
                del self.holders[key]

    def prefix_blocks(self, keys, names) -> dict[str, int]:
        """Number of leading ``keys`` each of ``names`` holds."""
        out, alive = {n: 0 for n in names}, set(names)
        for i, k in enumerate(keys):
            held = self.holders.get(k)
            if not held:
                break
            gone = alive - held
            for n in gone:
                out[n] = i
            alive -= gone
            if not alive:
                return out
            for n in alive:
                out[n] = i + 1
        return out


@dataclass
class PrefillState:
    name: str
    busy_until: float = 0.0  # predicted time the queued and running prefills are done
    queued: int = 0  # requests placed here and not yet prefilled
    cache: PrefixIndex | None = None  # the blocks this instance holds (None: holds nothing)
    slowdown: float = 1.0  # observed over predicted prefill time (the live correction; 1 in the simulator)
    transfer_slowdown: float = 1.0  # the same for its fetches of a prefix from another node's store

    def queue_s(self, now: float) -> float:
        return max(0.0, self.busy_until - now)


@dataclass
class DecodeState:
    name: str
    running: int = 0  # sequences in the continuous batch
    kv_bytes: float = 0.0  # KV the batch reads per step
    incoming: int = 0  # placed here, still prefilling
    incoming_kv_bytes: float = 0.0
    finish_rate: float = 0.0  # sequences leaving per second (recent), for prediction
    slowdown: float = 1.0  # observed over predicted step time (the live correction; 1 in the simulator)


@dataclass
class ClusterView:
    """The Conductor's picture of the cluster. ``prefill``/``decode`` name the instances; the rest
    is optional so that a bare ``ClusterView(["p0"], ["d0"])`` still works for simple policies."""

    prefill: list[str]
    decode: list[str]
    load: dict[str, dict] = field(default_factory=dict)  # raw load reports, by worker name
    now: float = 0.0
    block_size: int = 64
    fingerprint: int = 0
    prefill_state: dict[str, PrefillState] = field(default_factory=dict)
    decode_state: dict[str, DecodeState] = field(default_factory=dict)
    locator: BlockLocator = field(default_factory=BlockLocator)
    colocated: bool = False  # prefill and decode run on the same instances (chunked prefill)
    nodes: dict[str, str] = field(default_factory=dict)  # worker -> its node (holder); empty: each its own
    caches: dict[str, PrefixIndex] = field(default_factory=dict)  # holder -> the blocks it holds

    def __post_init__(self) -> None:
        for n in self.prefill:
            self.prefill_state.setdefault(n, PrefillState(n))
        for n in self.decode:
            self.decode_state.setdefault(n, DecodeState(n))

    # -- caches ----------------------------------------------------------------------------------
    def node_of(self, name: str) -> str:
        """The holder whose cache ``name`` reads first: its node, or itself without a node map."""
        return self.nodes.get(name, name)

    def attach_cache(self, name: str, capacity_blocks: int | None, policy: str = "lru") -> PrefixIndex:
        """Give ``name``'s holder (a prefill instance, or a node) a prefix index that the locator
        mirrors; every prefill instance of that holder shares it."""
        holder = self.node_of(name)
        index = PrefixIndex(self.block_size, capacity_blocks, policy, fingerprint=self.fingerprint,
                            on_remove=lambda k, h=holder: self.locator.discard(k, h))
        self.caches[holder] = index
        for p, state in self.prefill_state.items():
            if self.node_of(p) == holder:
                state.cache = index
        return index

    def cache_insert(self, name: str, keys, n_tokens: int) -> None:
        holder = self.node_of(name)
        cache = self.caches.get(holder) or self.attach_cache(name, None)
        for k in cache.insert_keys(list(keys), n_tokens):
            self.locator.add(k, holder)

    def cache_touch(self, name: str, keys) -> None:
        cache = self.caches.get(self.node_of(name))
        if cache is not None and keys:
            cache.touch([k for k in keys if k in cache])

    def forget_holder(self, holder: str) -> None:
        """A holder's blocks are gone (its node or store was lost): an empty index in its place."""
        cache = self.caches.get(holder)
        if cache is not None:
            for k in list(cache.entries):
                self.locator.discard(k, holder)
            self.attach_cache(holder, cache.capacity, cache.policy)

    def keys_of(self, request) -> list[int]:
        """The request's block keys: given (trace replay) or chained from its token ids."""
        if getattr(request, "block_keys", ()):
            return list(request.block_keys)
        return block_keys(self.fingerprint, request.prompt, self.block_size)

    def prefix_tokens(self, request, keys=None) -> dict[str, int]:
        """Cached prefix (tokens) of the request on every prefill instance."""
        keys = self.keys_of(request) if keys is None else keys
        n = request.prompt_tokens
        if not self.nodes:  # each instance its own holder (the simulator's hot path)
            blocks = self.locator.prefix_blocks(keys, self.prefill)
            return {p: min(b * self.block_size, n) for p, b in blocks.items()}
        blocks = self.locator.prefix_blocks(keys, list(dict.fromkeys(self.node_of(p) for p in self.prefill)))
        return {p: min(blocks[self.node_of(p)] * self.block_size, n) for p in self.prefill}

    def best_holder(self, request, keys=None) -> tuple[str | None, int]:
        """The holder with the longest cached prefix of the request (ties: the first name) and its
        tokens; (None, 0) when nobody holds any of it."""
        keys = self.keys_of(request) if keys is None else keys
        blocks = self.locator.prefix_blocks(keys, sorted(self.caches))
        if not blocks or max(blocks.values()) == 0:
            return None, 0
        holder = max(sorted(blocks), key=lambda h: blocks[h])
        return holder, min(blocks[holder] * self.block_size, request.prompt_tokens)
