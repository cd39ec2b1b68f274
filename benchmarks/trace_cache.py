"""Replay a Mooncake trace through the real prefix index: cache hit ratios per capacity and policy.

    python benchmarks/trace_cache.py --trace ../shared/traces/conversation_trace.jsonl \
        [--capacity-tokens N] [--policy lru|slru|lfu] [--json]
    python benchmarks/trace_cache.py --trace ... --table     # LRU, SLRU and LFU at 1M, 3M, 10M and unbounded

One global cache (one index) sees every request in arrival order: a request first matches
its prefix (hit), then its input blocks are cached. Trace blocks are 512 tokens.
"""
from __future__ import annotations

import argparse
import json

from kvstore.index import PrefixIndex
from kvstore.keys import trace_block_keys
from kvstore.trace import TRACE_BLOCK, load_trace


def replay(rows: list[dict], capacity_tokens: int | None, policy: str) -> dict:
    cap = None if capacity_tokens is None else max(1, capacity_tokens // TRACE_BLOCK)
    index = PrefixIndex(TRACE_BLOCK, capacity_blocks=cap, policy=policy)
    hit_tokens = total_tokens = hit_blocks = total_blocks = 0
    for r in rows:
        keys = trace_block_keys(r["hash_ids"])
        m = index.match_keys(keys, r["input_length"])
        hit_tokens += m.tokens
        hit_blocks += len(m.keys)
        total_tokens += r["input_length"]
        total_blocks += len(keys)
        index.insert_keys(keys, r["input_length"])
    return {"requests": len(rows), "capacity_tokens": capacity_tokens, "policy": policy,
            "hit_ratio_tokens": hit_tokens / total_tokens, "hit_ratio_blocks": hit_blocks / total_blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True)
    parser.add_argument("--capacity-tokens", type=int, default=None, help="default: unbounded")
    parser.add_argument("--policy", default="lru", choices=["lru", "slru", "lfu"])
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = load_trace(args.trace)
    if not args.table:
        out = replay(rows, args.capacity_tokens, args.policy)
        print(json.dumps(out) if args.json else
              f"{out['requests']} requests, token hit ratio {out['hit_ratio_tokens']:.4f}, "
              f"block hit ratio {out['hit_ratio_blocks']:.4f}")
        return
    results = [replay(rows, cap, pol) for cap in (1_000_000, 3_000_000, 10_000_000, None) for pol in ("lru", "slru", "lfu")]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{'capacity':>12} {'policy':>6} {'token hits':>11} {'block hits':>11}")
    for r in results:
        cap = "unbounded" if r["capacity_tokens"] is None else f"{r['capacity_tokens']:,}"
        print(f"{cap:>12} {r['policy']:>6} {r['hit_ratio_tokens']:>11.4f} {r['hit_ratio_blocks']:>11.4f}")


if __name__ == "__main__":
    main()
