"""Concurrent requests through a local cluster whose KV pools hold only a few of them at a time: how many
complete, how many end with an error, how long the batch takes, and how many moved (migrations).

    python -m benchmarks.full_decode_pool [--requests 16] [--prompt 150] [--max-tokens 24]
                                          [--num-blocks 24] [--runs 2]

skv-tiny, the default int8 precision, 1 prefill + 1 decode worker on 127.0.0.1; every worker's pool has
``--num-blocks`` blocks per KV group (16 tokens a block). To compare two trees, run it from each with
``PYTHONPATH=<tree>`` so that the Ray workers import that tree too.
"""
from __future__ import annotations

import argparse
import os
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--num-blocks", type=int, default=24)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import pdserve.cluster as cluster_module
    from model.config import QuantConfig
    from model.engine import EngineConfig, SamplingParams

    print(f"tree: {os.path.dirname(os.path.dirname(cluster_module.__file__))}")
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    pools = EngineConfig(num_blocks=args.num_blocks, max_seqs=8)
    with cluster_module.LocalCluster("skv-tiny", quant=QuantConfig(), num_cpus=2, engine_config=pools) as cluster:
        for run in range(args.runs):
            prompts = [[(run * 50 + 7 * i + j) % 400 + 3 for j in range(args.prompt)] for i in range(args.requests)]
            results: dict[int, str] = {}

            def one(i: int) -> None:
                try:
                    tokens = [t for out in cluster.stream(cluster.submit(prompts[i], params)) for t in out.token_ids]
                    results[i] = "ok" if len(tokens) == args.max_tokens else f"{len(tokens)} tokens"
                except Exception as e:  # noqa: BLE001 - counted and shown
                    results[i] = f"{type(e).__name__}: {str(e)[:100]}"

            start = time.monotonic()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(args.requests)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            ok = sum(r == "ok" for r in results.values())
            errors = sorted({r for r in results.values() if r != "ok"})
            print(f"run {run + 1}: {ok}/{args.requests} completed in {time.monotonic() - start:.1f} s; "
                  f"migrations so far {cluster.status()['counters']['migrations']}; errors: {errors or 'none'}")


if __name__ == "__main__":
    main()
