"""The disaggregated cluster on this machine: TTFT with a cached vs recomputed history, and
end-to-end throughput of concurrent requests against the single-process engine, one run.

    python -m benchmarks.cluster [--model smollm2-135m] [--history 2048] [--requests 32]
                                 [--prompt 256] [--output 64] [--runs 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.common import machine, random_prompts
from model.engine import Engine, EngineConfig, SamplingParams


def ttft(cluster, prompt, params, session=None) -> float:
    t = time.perf_counter()
    sub = cluster.submit(prompt, params, session_id=session)
    stream = cluster.stream(sub)
    next(stream)
    first = time.perf_counter() - t
    for _ in stream:
        pass
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--history", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from model.loader import load
    from pdserve.cluster import LocalCluster

    res = {"machine": machine(), "model": args.model}
    with LocalCluster(args.model, engine_config=EngineConfig(max_batched_tokens=2048)) as cluster:
        vocab = cluster.model_config.vocab_size
        params = SamplingParams(max_tokens=16, ignore_eos=True)
        cached, fresh = [], []
        for run in range(args.runs):
            history = random_prompts(1, args.history, vocab, seed=100 + run)[0]
            first = ttft(cluster, history, params, session=f"s{run}")  # turn 1 publishes prompt + answer
            turn2 = history + random_prompts(1, 32, vocab, seed=200 + run)[0]
            cached.append(ttft(cluster, turn2, params, session=f"s{run}"))
            fresh.append(ttft(cluster, random_prompts(1, len(turn2), vocab, seed=300 + run)[0], params))
            del first
        res["ttft_cached_s"] = statistics.median(cached)
        res["ttft_recomputed_s"] = statistics.median(fresh)
        res["ttft_ratio"] = res["ttft_cached_s"] / res["ttft_recomputed_s"]

        prompts = random_prompts(args.requests, args.prompt, vocab, seed=7)
        out_params = SamplingParams(max_tokens=args.output, ignore_eos=True)
        t = time.perf_counter()
        subs = [cluster.submit(p, out_params) for p in prompts]
        n = sum(len(o.token_ids) for s in subs for o in cluster.stream(s))
        wall = time.perf_counter() - t
        hands = [s.handoff.result() for s in subs]
        res["cluster_wall_s"] = wall
        res["cluster_tok_s"] = n / wall
        res["cluster_prefill_s_sum"] = sum(h.timings["prefill"] for h in hands)
        res["cluster_load_prefix_s_sum"] = sum(h.timings["load_prefix"] for h in hands)
        res["cluster_publish_s_sum"] = sum(h.timings["publish"] for h in hands)
        res["decode_mean_step_s"] = cluster.loads()["decode-0"]["mean_step_s"]

    model = load(args.model).model
    engine = Engine(model, EngineConfig(max_batched_tokens=2048))
    engine.eos_ids = set()
    t = time.perf_counter()
    outs = engine.generate(prompts, out_params)
    res["engine_wall_s"] = time.perf_counter() - t
    res["engine_tok_s"] = sum(map(len, outs)) / res["engine_wall_s"]
    res["cluster_vs_engine"] = res["cluster_tok_s"] / res["engine_tok_s"]
    print(json.dumps(res, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
