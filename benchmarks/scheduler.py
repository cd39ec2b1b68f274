"""Scheduler policies on the Mooncake conversation trace, through the simulator.

    python -m benchmarks.scheduler [--trace ../shared/traces/conversation_trace.jsonl] [--speeds 1,2]
        [--cost-model llama3-70b-a800] [--json OUT] [--sweep 1,2,3,4,6] [--plot DIR]

Prints, per speed and per deployment (8 prefill + 8 decode disaggregated, 16 colocated instances
with chunked prefill): TTFT mean/p99, TBT p99, SLO attainment at TBT 100/200/300 ms with a 30 s
TTFT SLO, goodput at 100 ms, rejections and the token hit ratio; then our policy's goodput over
mooncake's per speed, and the decision latency of every policy with 64 prefill + 64 decode
instances.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import machine
from scheduler.cost_model import load_cost_model
from scheduler.policies import SLO, policy_names
from scheduler.sim_run import load_requests, simulate
from scheduler.simulator import SimConfig

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"
POLICIES = ("random", "round_robin", "least_loaded", "cache_aware", "mooncake", "goodput")


def table(rows: list[dict]) -> None:
    print(f"| policy | TTFT mean s | TTFT p99 s | TBT p99 ms | SLO 100/200/300 ms | goodput@100 req/s "
          f"| rejected | hit ratio |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        att = "/".join(f"{r[f'slo_attainment_tbt{ms}']:.3f}" for ms in (100, 200, 300))
        print(f"| {r['policy']} | {r['ttft_mean']:.2f} | {r['ttft_p99']:.2f} | {r['tbt_p99'] * 1e3:.0f} | {att} "
              f"| {r['goodput_rps_tbt100']:.3f} | {r['rejected']} | {r['cache_hit_ratio']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--cost-model", default="llama3-70b-a800")
    ap.add_argument("--speeds", default="1,2")
    ap.add_argument("--sweep", default="1,2,3,4,6", help="speeds for the goodput ratio (our policy / mooncake)")
    ap.add_argument("--cache-tokens", type=int, default=2_000_000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="directory for the sweep's goodput/TTFT PNGs")
    args = ap.parse_args()
    reqs, bs = load_requests(args.trace)
    cost, slo = load_cost_model(args.cost_model), SLO(30.0, 0.1)
    print(f"# {len(reqs)} requests from {args.trace}; cost model {cost.name}; {machine()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results = []
    for speed in (float(s) for s in args.speeds.split(",")):
        for colocated in (False, True):
            cfg = SimConfig(8, 8, bs, args.cache_tokens, speed, colocated)
            rows = [simulate(reqs, p, cost, cfg, slo) for p in POLICIES]
            results += rows
            where = "16 colocated instances (chunked prefill)" if colocated else "8 prefill + 8 decode"
            print(f"\n## speed {speed:g}x, {where}\n")
            table(rows)
    sweep = []
    print("\n## goodput at TBT 100 ms / TTFT 30 s, 8P+8D: ours over mooncake\n")
    print("| speed | mooncake req/s | goodput req/s | ratio | mooncake TTFT mean | goodput TTFT mean |")
    print("|---:|---:|---:|---:|---:|---:|")
    for speed in (float(s) for s in args.sweep.split(",")):
        cfg = SimConfig(8, 8, bs, args.cache_tokens, speed)
        m, g = (simulate(reqs, p, cost, cfg, slo) for p in ("mooncake", "goodput"))
        sweep += [m, g]
        print(f"| {speed:g} | {m['goodput_rps']:.3f} | {g['goodput_rps']:.3f} | {g['goodput_rps'] / m['goodput_rps']:.3f} "
              f"| {m['ttft_mean']:.2f} | {g['ttft_mean']:.2f} |")
    print("\n## decision latency, 64 prefill + 64 decode instances (first 3000 requests at 16x)\n")
    print("| policy | mean us | p99 us |\n|---|---:|---:|")
    for p in policy_names():
        r = simulate(reqs[:3000], p, cost, SimConfig(64, 64, bs, args.cache_tokens, 16.0), slo)
        print(f"| {p} | {r['decision_us_mean']:.0f} | {r['decision_us_p99']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": results, "sweep": sweep}, indent=1))
    if args.plot:
        from pdserve.sim_cli import plot_sweep

        for path in plot_sweep(sweep, args.plot):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
