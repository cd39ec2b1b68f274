"""KV transfer through the store on one node, against a plain numpy copy in the same run.

    python benchmarks/kv_transfer.py [--mib 64] [--runs 5] [--json]

A 64 MiB batch of SmolLM2-layout blocks (int8 K/V + float32 scales, 30 KV groups) is put in
the store; a worker-side get is timed (1) in process and (2) through the store's Ray actor on
the same node (Ray's object store). Small blocks (16 tokens, one group) give the per-block cost.
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
