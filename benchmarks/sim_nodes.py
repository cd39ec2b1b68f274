"""The same placement policies on the Mooncake conversation trace with caches per node vs one
global store, through the simulator (issue 17).

    python -m benchmarks.sim_nodes [--trace ../shared/traces/conversation_trace.jsonl] [--speed 1]
        [--policies cache_aware,mooncake] [--nodes 4] [--json OUT]

8 prefill + 8 decode instances, LLaMA3-70B on A800s (the paper's cost model), 2M tokens of cache
per prefill instance in every deployment (the same total):
- ``per instance``: each prefill instance its own cache (the paper's setting, ``pdserve sim``);
- ``N nodes``: two prefill instances per node share the node's store; a prefix on another node is
  fetched when the cost model says that beats recomputing it (what a multi-node pdserve does);
- ``1 global store``: every instance reads one store (no fetch ever needed): the bound.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import machine
from benchmarks.scheduler import TRACE, table
from scheduler.cost_model import load_cost_model
from scheduler.policies import SLO
from scheduler.sim_run import load_requests, simulate
from scheduler.simulator import SimConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--cost-model", default="llama3-70b-a800")
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--policies", default="cache_aware,mooncake")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    requests, bs = load_requests(args.trace)
    cost = load_cost_model(args.cost_model)
    print(f"# {len(requests)} requests from {args.trace}; cost model {cost.name}; speed {args.speed:g}x; {machine()}")
    out = []
    for n_nodes, label in ((0, "per instance"), (args.nodes, f"{args.nodes} nodes"), (1, "1 global store")):
        rows = []
        for policy in args.policies.split(","):
            cfg = SimConfig(n_prefill=8, n_decode=8, block_size=bs, speed=args.speed, n_nodes=n_nodes)
            r = simulate(requests, policy, cost, cfg, SLO())
            r["deployment"] = label
            rows.append(r)
        print(f"\n### {label}\n")
        table(rows)
        out += rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
