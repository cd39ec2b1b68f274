"""KV transfer through the store on one node, against a plain numpy copy in the same run.

    python benchmarks/kv_transfer.py [--mib 64] [--runs 5] [--json]
    python benchmarks/kv_transfer.py --nodes [--mib 32] [--runs 5] [--json]

A 64 MiB batch of SmolLM2-layout blocks (int8 K/V + float32 scales, 30 KV groups) is put in
the store; a worker-side get is timed (1) in process and (2) through the store's Ray actor on
the same node (Ray's object store). Small blocks (16 tokens, one group) give the per-block cost.

``--nodes`` (issue 17): a ``ray.cluster_utils.Cluster`` of two raylets on this machine, a store
pinned on each; the reader (this driver, on the head node) fetches as a worker does
(``kvstore.actor.fetch_export``: refs from the store, bytes from Ray, checksums, join) from the
store on its own node and from the store on the other node, where Ray moves the bytes between
the two object stores. Each run reads a prefix it has never read (a reader keeps a copy of what
Ray moved to it). Per-request overhead: a one-block (16-token) fetch, same node vs the other.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from benchmarks.common import machine
from kvstore.blocks import BlockSpec, join_export
from kvstore.index import KVLayout
from kvstore.store import KVStore, StoreConfig
from model.engine.block_pool import GroupBlocks, KVExport

FP = 1


def make_export(spec: BlockSpec, n_blocks: int, seed: int = 0) -> KVExport:
    rng = np.random.default_rng(seed)
    groups = [GroupBlocks(0, rng.integers(-127, 128, (n_blocks, *spec.kv_shape), dtype=np.int8),
                          rng.integers(-127, 128, (n_blocks, *spec.kv_shape), dtype=np.int8),
                          rng.random((n_blocks, *spec.scale_shape), dtype=np.float32),
                          rng.random((n_blocks, *spec.scale_shape), dtype=np.float32)) for _ in range(spec.n_groups)]
    return KVExport(spec.block_size, 0, n_blocks * spec.block_size, groups)


def timed(fn, runs: int) -> float:
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--nodes", action="store_true", help="same node vs another Ray node (a local Cluster)")
    args = parser.parse_args()
    if args.nodes:
        res = across_nodes(args.mib, args.runs)
        print(json.dumps(res, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))
        return
    big = BlockSpec(64, 3, 64, 30)
    n = max(1, args.mib * 2**20 // big.nbytes((1 << 30) - 1))
    data = make_export(big, n)
    tokens = list(range(n * big.block_size))
    layout = KVLayout(global_mask=(1 << 30) - 1)
    nbytes = data.nbytes
    res = {"machine": machine(), "bytes": nbytes, "blocks": n}

    flat = np.concatenate([a.reshape(-1).view(np.uint8) for g in data.groups for a in (g.k, g.v, g.k_scale, g.v_scale)])
    res["numpy_copy_gb_s"] = nbytes / timed(lambda: flat.copy(), args.runs) / 1e9

    store = KVStore(big, FP, layout, StoreConfig(host_capacity_blocks=4 * n))
    store.put(tokens, data, FP)
    m = store.match(tokens)
    res["store_get_in_process_gb_s"] = nbytes / timed(lambda: store.get(m.keys, m.tokens), args.runs) / 1e9

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    from kvstore.actor import start_store

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        actor = start_store(big, FP, layout, StoreConfig(host_capacity_blocks=4 * n))
        ray.get(actor.put.remote(tokens, data, FP))
        rm = ray.get(actor.match.remote(tokens))
        def fetch(actor_, keys, end, spec):  # what a worker does: refs from the store, bytes from Ray
            refs = ray.get(actor_.get_refs.remote(keys))
            bufs = ray.get([r for _, r in refs])
            return join_export(spec, [(m, b) for (m, _), b in zip(refs, bufs)], end)

        res["store_get_ray_same_node_gb_s"] = nbytes / timed(lambda: fetch(actor, rm.keys, rm.tokens, big),
                                                               args.runs) / 1e9
        res["store_get_ray_by_value_gb_s"] = nbytes / timed(lambda: ray.get(actor.get.remote(rm.keys, rm.tokens)),
                                                              args.runs) / 1e9
        small = BlockSpec(16, 1, 16, 1)
        k = 2048
        sdata = make_export(small, k)
        stoks = list(range(k * small.block_size))
        sactor = start_store(small, FP, KVLayout(), StoreConfig(host_capacity_blocks=4 * k))
        ray.get(sactor.put.remote(stoks, sdata, FP))
        sm = ray.get(sactor.match.remote(stoks))
        res["small_block_us_per_block_ray"] = 1e6 * timed(lambda: fetch(sactor, sm.keys, sm.tokens, small),
                                                          args.runs) / k
    finally:
        ray.shutdown()
    res["ray_vs_copy"] = res["store_get_ray_same_node_gb_s"] / res["numpy_copy_gb_s"]
    res["in_process_vs_copy"] = res["store_get_in_process_gb_s"] / res["numpy_copy_gb_s"]
    print(json.dumps(res, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


def across_nodes(mib: int, runs: int) -> dict:
    """GB/s and one-block latency of a worker's fetch from its own node's store vs another node's."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from kvstore.actor import fetch_export, start_store
    from pdserve.topology import pinned

    big = BlockSpec(64, 3, 64, 30)
    n = max(1, mib * 2**20 // big.nbytes((1 << 30) - 1))
    layout = KVLayout(global_mask=(1 << 30) - 1)
    store_mib = (runs + 2) * mib * 2 + 64
    args = dict(num_cpus=1, object_store_memory=store_mib * 2**20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **args))
    res = {"machine": machine(), "bytes": 0, "blocks": n, "runs": runs}
    try:
        far_node = cluster.add_node(**args)
        ray.init(address=cluster.address, log_to_driver=False)
        here = ray.get_runtime_context().get_node_id()
        small = BlockSpec(16, 1, 16, 1)
        stores = {}
        for where, node_id in (("same_node", here), ("other_node", far_node.node_id)):
            cfg = StoreConfig(host_capacity_blocks=(runs + 2) * n + 64)
            stores[where] = (start_store(big, FP, layout, cfg, options=pinned(node_id)),
                             start_store(small, FP, KVLayout(), StoreConfig(host_capacity_blocks=4096),
                                         options=pinned(node_id)))
        data = make_export(big, n)
        res["bytes"] = nbytes = data.nbytes
        flat = np.concatenate([a.reshape(-1).view(np.uint8) for g in data.groups
                               for a in (g.k, g.v, g.k_scale, g.v_scale)])
        res["numpy_copy_gb_s"] = nbytes / timed(lambda: flat.copy(), runs) / 1e9
        one = make_export(small, 1)
        for where, (store, sstore) in stores.items():
            prefixes = []
            for r in range(runs + 1):  # a distinct prefix per run: never one Ray already moved here
                tokens = [r * 100_000 + t for t in range(n * big.block_size)]
                ray.get(store.put.remote(tokens, data, FP))
                prefixes.append(ray.get(store.match.remote(tokens, False)))
            it = iter(prefixes)
            remote = where == "other_node"
            t = timed(lambda: (lambda m: fetch_export(store, big, m.keys, m.tokens, 120, remote))(next(it)), runs)
            res[f"{where}_gb_s"] = nbytes / t / 1e9
            blocks = []
            for r in range(4 * runs + 1):
                tokens = [r * 1000 + t for t in range(small.block_size)]
                ray.get(sstore.put.remote(tokens, one, FP))
                blocks.append(ray.get(sstore.match.remote(tokens, False)))
            it2 = iter(blocks)
            res[f"{where}_one_block_ms"] = 1e3 * timed(
                lambda: (lambda m: fetch_export(sstore, small, m.keys, m.tokens, 60, remote))(next(it2)), 4 * runs)
        res["other_vs_same_node"] = res["other_node_gb_s"] / res["same_node_gb_s"]
        res["same_node_vs_copy"] = res["same_node_gb_s"] / res["numpy_copy_gb_s"]
        res["other_node_vs_copy"] = res["other_node_gb_s"] / res["numpy_copy_gb_s"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    return res


if __name__ == "__main__":
    main()
