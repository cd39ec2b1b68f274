"""The store as a Ray actor, one per node. Blocks live in Ray's object store, owned by this actor,
so they outlive the workers that produced them; a get from another node's store is an actor
call whose result Ray moves between the nodes."""
from __future__ import annotations

import numpy as np
import xxhash

from kvstore.blocks import BlockSpec
from kvstore.errors import KVLoadError
from kvstore.faults import Fault, Faults
from kvstore.index import KVLayout
from kvstore.store import KVStore, StoreConfig


class StoreActor(KVStore):
    def __init__(self, spec: BlockSpec, fingerprint: int, layout: KVLayout = KVLayout(),
                 config: StoreConfig = StoreConfig()):
        import uuid

        super().__init__(spec, fingerprint, layout, config, use_ray=True)
        self.incarnation = uuid.uuid4().hex[:12]
        self.faults = Faults()

    def put(self, tokens, data, fingerprint: int) -> list[int] | None:
        self.faults.hit("store.put")
        return super().put(tokens, data, fingerprint)

    def get_refs(self, keys: list[int], with_digest: bool = False, end: int | None = None):
        self.faults.hit("store.get")
        return super().get_refs(keys, with_digest, end)

    def replicate(self, source, keys: list[int], timeout_s: float = 10.0) -> list[int]:
        """Copy a prefix from another node's store (hot-block replication): this store pulls the
        blocks through Ray's object store, window-trimmed and checksum-verified, and indexes them as
        its own. Returns the keys it holds of that prefix afterwards ([] if the source lost them)."""
        import ray

        tokens = ray.get(source.tokens_of.remote(keys), timeout=timeout_s)
        if not tokens:
            return []
        try:
            data = fetch_export(source, self.spec, keys, len(tokens), timeout_s, remote=True)
        except KVLoadError:
            return []
        self.put(tokens, data, self.fingerprint)
        held = self.match(tokens, False).keys
        self.stats.replicated_blocks += len(held)
        return held

    def arm_fault(self, point: str, action: str = "exit", after: int = 0, times: int = 1,
                  seconds: float = 0.0) -> None:
        """Fault injection at "store.put" or "store.get" (see ``kvstore.faults``)."""
        self.faults.arm(Fault(point, action, after, times, seconds))

    def get(self, keys: list[int], end: int):
        """By value: contiguous arrays, which Ray serializes without a per-element copy. Readers on
        this node should prefer ``get_refs`` (zero-copy) and join the blocks themselves."""
        out = super().get(keys, end)
        if out is not None:
            for g in out.groups:
                g.k, g.v = np.ascontiguousarray(g.k), np.ascontiguousarray(g.v)
                g.k_scale, g.v_scale = np.ascontiguousarray(g.k_scale), np.ascontiguousarray(g.v_scale)
        return out

    def ping(self) -> dict:
        """Cheap liveness for the supervisor: ``incarnation`` changes when Ray restarts this actor
        (empty: every block it held is gone)."""
        return {"incarnation": self.incarnation, "blocks": len(self.index.entries)}

    def pid(self) -> int:
        import os

        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def start_store(spec: BlockSpec, fingerprint: int, layout: KVLayout, config: StoreConfig,
                resources: dict[str, float] | None = None, name: str | None = None, options: dict | None = None):
    """Start a store actor (no CPU reserved: it mostly waits), optionally pinned to a node by a
    custom resource or by ``options`` (a node-affinity scheduling strategy) and registered under ``name``."""
    import ray

    # restartable: a store that dies comes back empty (its blocks lived in its own objects)
    options = {"num_cpus": 0, "resources": resources or {}, "max_restarts": -1, "max_task_retries": 0,
               **(options or {})}
    if name:
        options["name"] = name
    return ray.remote(StoreActor).options(**options).remote(spec, fingerprint, layout, config)


def fetch_export(store, spec: BlockSpec, keys: list[int], end: int, timeout_s: float | None = None,
                 remote: bool = False):
    """A prefix's KV from a store: a local ``KVStore`` directly, an actor by object refs (zero-copy
    from the object store on the same node, moved by Ray from another), joined here. Every block is
    checked against the checksum the store recorded when it was put; a missing, damaged or late
    block raises ``KVLoadError`` (the caller recomputes those tokens: never wrong KV).
    ``remote``: the store is on another node, so it trims what the window cannot read before Ray
    moves the bytes."""
    if not hasattr(store.get_refs, "remote"):
        out = store.get(keys, end)
        if out is None:
            raise KVLoadError(f"KV store: {len(keys)} block(s) of the prefix are gone")
        return out
    import ray

    from kvstore.blocks import join_export

    try:
        refs = ray.get(store.get_refs.remote(keys, True, end if remote else None), timeout=timeout_s)
        if refs is None:
            raise KVLoadError(f"KV store: {len(keys)} block(s) of the prefix are gone")
        bufs = ray.get([ref for _, ref, _ in refs], timeout=timeout_s)
    except KVLoadError:
        raise
    except Exception as e:  # dead, restarting, lost objects, timeout: all the same to the reader
        raise KVLoadError(f"KV store: fetching {len(keys)} block(s) failed ({type(e).__name__})") from None
    for i, ((_, _, digest), buf) in enumerate(zip(refs, bufs)):
        if digest is not None and xxhash.xxh3_64_intdigest(np.ascontiguousarray(buf).view(np.uint8)) != digest:
            raise KVLoadError(f"KV store: block {i} of the prefix fails its checksum", i)
    return join_export(spec, [(mask, buf) for (mask, _, _), buf in zip(refs, bufs)], end)
