"""What the Conductor knows about the cluster: per-instance prefill queues, decode batches, and which
KV blocks each instance holds.

Block holdings use the real prefix index (``kvstore.index.PrefixIndex``, one per instance, with
its capacity and eviction order) and the chained block keys of ``kvstore.keys`` (never Python's
``hash()``). A ``BlockLocator`` maps each key to the instances holding it, so the longest cached
prefix on every instance comes from one walk over the request's keys (the "global metadata" of
Mooncake), which keeps a decision well under a millisecond with 64 instances.
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

    def __post_init__(self) -> None:
        for n in self.prefill:
            self.prefill_state.setdefault(n, PrefillState(n))
        for n in self.decode:
            self.decode_state.setdefault(n, DecodeState(n))

    # -- caches ----------------------------------------------------------------------------------
    def attach_cache(self, name: str, capacity_blocks: int | None, policy: str = "lru") -> PrefixIndex:
        """Give prefill instance ``name`` a prefix index whose contents the locator mirrors."""
        index = PrefixIndex(self.block_size, capacity_blocks, policy, fingerprint=self.fingerprint,
                            on_remove=lambda k, n=name: self.locator.discard(k, n))
        self.prefill_state[name].cache = index
        return index

    def cache_insert(self, name: str, keys, n_tokens: int) -> None:
        state = self.prefill_state[name]
        if state.cache is None:
            self.attach_cache(name, None)
        for k in state.cache.insert_keys(list(keys), n_tokens):
            self.locator.add(k, name)

    def cache_touch(self, name: str, keys) -> None:
        cache = self.prefill_state[name].cache
        if cache is not None and keys:
            cache.touch([k for k in keys if k in cache])

    def keys_of(self, request) -> list[int]:
        """The request's block keys: given (trace replay) or chained from its token ids."""
        if getattr(request, "block_keys", ()):
            return list(request.block_keys)
        return block_keys(self.fingerprint, request.prompt, self.block_size)

    def prefix_tokens(self, request, keys=None) -> dict[str, int]:
        """Cached prefix (tokens) of the request on every prefill instance."""
        keys = self.keys_of(request) if keys is None else keys
        blocks = self.locator.prefix_blocks(keys, self.prefill)
        n = request.prompt_tokens
        return {p: min(b * self.block_size, n) for p, b in blocks.items()}
