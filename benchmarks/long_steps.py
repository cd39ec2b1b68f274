"""Health while the decode worker takes long steps: requests whose KV cannot be fetched at decode (an
injected ``kv.fetch`` failure, as a lost store would cause) are recomputed there, 512 prompt tokens a
step; how often and how long the cluster reads as not serving (the gRPC health NOT_SERVING) and the
decode worker as out of placement meanwhile, and whether every request completes.

    python -m benchmarks.long_steps [--model smollm2-135m] [--requests 4] [--prompt 3000] [--max-tokens 16]

1 prefill + 1 decode worker on 127.0.0.1, the model's default precision. To compare two trees, run it
from each with ``PYTHONPATH=<tree>`` so that the Ray workers import that tree too.
"""
from __future__ import annotations

import argparse
import os
import threading
import time

from benchmarks.common import random_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=3000)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import pdserve.cluster as cluster_module
    from model.engine import SamplingParams

    print(f"tree: {os.path.dirname(os.path.dirname(cluster_module.__file__))}")
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    with cluster_module.LocalCluster(args.model, num_cpus=2) as cluster:
        warm = cluster.submit(random_prompts(1, 64, seed=1)[0], SamplingParams(max_tokens=4, ignore_eos=True))
        list(cluster.stream(warm))
        cluster.arm_fault("decode-0", "kv.fetch", "raise", times=args.requests)
        samples: list[tuple[float, bool, str]] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                samples.append((time.monotonic(), cluster.serving(), cluster.supervisor.snapshot()["decode-0"]["state"]))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        subs = [cluster.submit(p, params) for p in random_prompts(args.requests, args.prompt, seed=2)]
        completed = sum(sum(len(o.token_ids) for o in cluster.stream(s)) == args.max_tokens for s in subs)
        wall = time.monotonic() - t0
        done.set()
        watcher.join(5)
        counters = cluster.counters.snapshot()
    drops, down_s = 0, 0.0
    for (t, serving, _), (t_next, serving_next, _) in zip(samples, samples[1:]):
        down_s += 0.0 if serving else t_next - t
        drops += serving and not serving_next
    states = sorted({s for _, _, s in samples})
    print(f"{args.requests} x ({args.prompt} -> {args.max_tokens}), {args.model}, KV recomputed at decode: "
          f"{completed}/{args.requests} completed in {wall:.1f} s; recomputed {counters['recomputed_tokens']} tokens, "
          f"migrations {counters['migrations']}")
    print(f"not serving: {drops} times, {down_s:.1f} s of {wall:.1f} s; decode-0 states seen: {', '.join(states)}")


if __name__ == "__main__":
    main()
