"""TTFT of a conversation turn whose history sits in another node's store: fetched vs recomputed.

    OMP_NUM_THREADS=1 python -m benchmarks.remote_prefix [--model smollm2-135m] [--history 2048] [--runs 3]

A ``ray.cluster_utils.Cluster`` of two raylets on this machine, a prefill and a decode worker pinned
on each (``pdserve.topology``). Turn 1 (``--history`` tokens) is served on node a, so a's store
holds its KV. Turn 2 (the history plus 32 new tokens) is then placed on node b, either fetching the
history from a's store through Ray (``cache_aware`` with remote fetch, what a multi-node cluster
does) or recomputing it (the same placement with remote fetch off). Every turn has a history of its
own, so nothing on node b (store or a worker's pool) has seen it: each run crosses nodes or
recomputes. TTFT = submit to the first token at the driver. ``transfer_observed_over_model``: the fetches'
prefix loading over the cost model's transfer time for those tokens, the ratio the Conductor's transfer
correction learns from.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.common import machine, random_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--history", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    from model.engine import EngineConfig, SamplingParams
    from pdserve.cluster import LocalCluster
    from pdserve.topology import NodeSpec, Topology

    node = dict(num_cpus=1, object_store_memory=300 * 2**20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **node))
    res: dict = {"machine": machine(), "model": args.model, "history_tokens": args.history, "runs": args.runs}
    try:
        for name in "ab":
            cluster.add_node(resources={f"bench-{name}": 1}, **node)
        ray.init(address=cluster.address, log_to_driver=False)
        topo = Topology(nodes=(NodeSpec("a", "bench-a", 1, 1), NodeSpec("b", "bench-b", 1, 1)))
        with LocalCluster(args.model, topology=topo, engine_config=EngineConfig(kv_cache_bytes=256 * 2**20)) as c:
            vocab = c.model_config.vocab_size
            one = SamplingParams(max_tokens=1, ignore_eos=True)
            times: dict[str, list[float]] = {"fetched": [], "recomputed": []}
            seen: dict[str, list] = {"fetched": [], "recomputed": []}
            turn1_s, transfer_vs_model = [], []
            for r in range(args.runs):
                for k, mode in enumerate(("fetched", "recomputed")):
                    # a history of its own each time: no worker's pool or store on b has seen it
                    history = random_prompts(1, args.history, vocab, seed=1000 * r + k)[0]
                    drain(c, "prefill-0", "decode-0")
                    t = time.perf_counter()
                    c.generate(history, one)  # turn 1 on node a: a's store holds the history
                    turn1_s.append(time.perf_counter() - t)
                    drain(c, "prefill-1", "decode-1")
                    c.policy.remote_fetch = mode == "fetched"
                    turn2 = history + random_prompts(1, 32, vocab, seed=1000 * r + k + 500)[0]
                    t = time.perf_counter()
                    sub = c.submit(turn2, one)
                    next(iter(c.stream(sub)))
                    times[mode].append(time.perf_counter() - t)
                    h = sub.handoff.result()
                    seen[mode].append({"fetch_from": sub.placement.fetch_from, "cached": h.cached_tokens,
                                       "remote": h.remote_tokens, "load_prefix_s": round(h.timings["load_prefix"], 3),
                                       "prefill_s": round(h.timings["prefill"], 3)})
                    if h.remote_tokens:  # what the Conductor's transfer correction sees of this fetch
                        cost = c.conductor.cost
                        model_s = cost.transfer_time(cost.kv_bytes(h.remote_tokens))
                        transfer_vs_model.append(h.timings["load_prefix"] / model_s)
            res["turn1_on_a_s"] = statistics.median(turn1_s)
            for mode in times:
                res[f"ttft_{mode}_s"] = statistics.median(times[mode])
                res[f"ttft_{mode}_all_s"] = [round(x, 3) for x in times[mode]]
                res[f"{mode}_runs"] = seen[mode]
            res["fetched_vs_recomputed"] = res["ttft_fetched_s"] / res["ttft_recomputed_s"]
            res["cost_model"] = c.conductor.cost.name
            if transfer_vs_model:  # loading the prefix over the model's transfer time (the correction's ratio)
                res["transfer_observed_over_model"] = round(statistics.median(transfer_vs_model), 2)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(res, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


def drain(c, *keep: str) -> None:
    """Placement sees only ``keep`` (the others stay up, out of placement)."""
    for n in [*c.prefill, *c.decode]:
        (c.conductor.mark_up if n in keep else c.conductor.mark_down)(n)


if __name__ == "__main__":
    main()
