"""Time from a decode worker's death to the next token of its migrated stream: resumed from the KV
the store holds vs recomputed, by context length.

    python -m benchmarks.migration [--model smollm2-135m] [--contexts 512 2048] [--runs 3] [--json]

A 1 prefill + 2 decode cluster (Ray on 127.0.0.1, default int8). One greedy request with a prompt
of ``context - 32`` tokens streams; after 16 tokens its decode worker is killed (SIGKILL) and the
gap from the kill to the next token is timed. "resumed": the new prefill loads the prompt and the
blocks the dead worker published while decoding, and computes the tail; "recomputed": the prefill
worker's KV fetch is made to fail (fault point kv.fetch), so it computes everything again. The
stream's tokens are checked against an undisturbed run each time.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray: bind 127.0.0.1 only

from benchmarks.common import machine  # noqa: E402
from model.engine import SamplingParams  # noqa: E402


def one(cluster, prompt: list[int], params: SamplingParams, expected: list[int], recompute: bool) -> float:
    sub = cluster.submit(prompt, params)
    stream = cluster.stream(sub)
    got = []
    while len(got) < 16:
        got.extend(next(stream).token_ids)
    if recompute:
        cluster.arm_fault(sub.placement.prefill, "kv.fetch", "raise")
    pid = cluster.ray.get(cluster.actor(sub.placement.decode).pid.remote(), timeout=30)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    gap = None
    for out in stream:
        if out.token_ids and gap is None:
            gap = time.monotonic() - t0
        got.extend(out.token_ids)
    if got != expected:
        raise AssertionError(f"migrated stream differs from the undisturbed run at context {len(prompt)}")
    return gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from pdserve.cluster import LocalCluster

    params = SamplingParams(max_tokens=32, ignore_eos=True)
    rows = []
    with LocalCluster(args.model, n_prefill=1, n_decode=2) as cluster:
        vocab = cluster.model_config.vocab_size
        for ctx in args.contexts:
            for mode in ("resumed", "recomputed"):
                gaps = []
                for r in range(args.runs):
                    prompt = [(7 * i + 13 * r + ctx) % (vocab - 3) + 3 for i in range(ctx - 32)]
                    expected, _, _ = cluster.generate(prompt, params)  # undisturbed (and now cached)
                    gaps.append(one(cluster, prompt, params, expected, mode == "recomputed"))
                    deadline = time.monotonic() + 120
                    while not all(s["state"] == "alive" for s in cluster.supervisor.snapshot().values()):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the killed worker did not come back in 120 s")
                        time.sleep(0.1)
                rows.append({"context": ctx, "mode": mode, "median_s": statistics.median(gaps), "runs_s": gaps})
        counters = cluster.status()["counters"]
    if args.json:
        print(json.dumps({"rows": rows, "counters": counters, "model": args.model, "machine": machine()}, indent=1))
        return
    print(f"{args.model}, 1 prefill + 2 decode, int8; kill -> next token of the migrated stream ({machine()})")
    print(f"{'context':>8} {'mode':>11} {'median s':>9}  runs")
    for row in rows:
        print(f"{row['context']:>8} {row['mode']:>11} {row['median_s']:>9.2f}  "
              + " ".join(f"{g:.2f}" for g in row["runs_s"]))
    print(f"cluster counters: {counters}")


if __name__ == "__main__":
    main()
