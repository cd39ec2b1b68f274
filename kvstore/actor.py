"""The store as a Ray actor, one per node. Blocks live in Ray's object store, owned by this actor,
so they outlive the workers that produced them; a get from another node's store is an actor
call whose result Ray moves between the nodes."""
from __future__ import annotations

import numpy as np

from kvstore.blocks import BlockSpec
from kvstore.index import KVLayout
from kvstore.store import KVStore, StoreConfig


class StoreActor(KVStore):
    def __init__(self, spec: BlockSpec, fingerprint: int, layout: KVLayout = KVLayout(),
                 config: StoreConfig = StoreConfig()):
        super().__init__(spec, fingerprint, layout, config, use_ray=True)

    def get(self, keys: list[int], end: int):
        """By value: contiguous arrays, which Ray serializes without a per-element copy. Readers on
        this node should prefer ``get_refs`` (zero-copy) and join the blocks themselves."""
        out = super().get(keys, end)
        if out is not None:
            for g in out.groups:
                g.k, g.v = np.ascontiguousarray(g.k), np.ascontiguousarray(g.v)
                g.k_scale, g.v_scale = np.ascontiguousarray(g.k_scale), np.ascontiguousarray(g.v_scale)
        return out

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def start_store(spec: BlockSpec, fingerprint: int, layout: KVLayout, config: StoreConfig,
                resources: dict[str, float] | None = None, name: str | None = None):
    """Start a store actor (no CPU reserved: it mostly waits), optionally pinned to a node by a
    custom resource and registered under ``name``."""
    import ray

    options = {"num_cpus": 0, "resources": resources or {}}
    if name:
        options["name"] = name
    return ray.remote(StoreActor).options(**options).remote(spec, fingerprint, layout, config)


def fetch_export(store, spec: BlockSpec, keys: list[int], end: int):
    """A prefix's KV from a store: a local ``KVStore`` directly, an actor by object refs (zero-copy
    from the object store on the same node, moved by Ray from another), joined here."""
    if not hasattr(store.get_refs, "remote"):
        return store.get(keys, end)
    import ray

    from kvstore.blocks import join_export

    refs = ray.get(store.get_refs.remote(keys))
    if refs is None:
        return None
    bufs = ray.get([ref for _, ref in refs])
    return join_export(spec, [(mask, buf) for (mask, _), buf in zip(refs, bufs)], end)
