"""Early rejection with and without the live cost correction: the Mooncake trace replayed open-loop (arrival
times kept) at more than the cluster can prefill, through a policy that rejects what it predicts would miss
the TTFT SLO. Without the correction the Conductor predicts with its cost model as it is (on a 2-core CPU
without ``pdserve calibrate``, the CPU fallback); with it, by each worker's observed speed.

    python -m benchmarks.cost_correction [--model smollm2-135m] [--requests 120] [--time-scale 1]
        [--ttft-slo 5] [--policy mooncake] [--runs 1]

For each mode (alternated over ``--runs``), one 1 prefill + 1 decode cluster on 127.0.0.1: four warm-up
requests one at a time (the first pays the engine's first-call costs; both modes get them), then the
trace. Per mode: requests admitted and rejected, TTFT of the admitted (p50 / p90 / max), how many met the
SLO, goodput (requests that met it per second of replay), and the Conductor's own figures at the end
(observed over predicted TTFT, each worker's slowdown). The TBT SLO is set lax (``--tbt-slo``, 1 s) so
that the TTFT prediction alone decides.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import time

from benchmarks.common import machine, random_prompts


def replay(cluster, jobs, slo_s: float) -> dict:
    from model.engine import SamplingParams
    from pdserve.driver import Rejected

    def one(job) -> tuple[str, float]:
        time.sleep(max(0.0, start + job.at_s - time.perf_counter()))
        t0 = time.perf_counter()
        try:
            sub = cluster.submit(job.prompt, SamplingParams(max_tokens=job.max_tokens, ignore_eos=True))
        except Rejected:
            return "rejected", 0.0
        ttft = None
        for _ in cluster.stream(sub):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
        return "done", ttft or 0.0

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        got = list(pool.map(one, jobs))
    span = max(j.at_s for j in jobs) or 1.0
    ttfts = sorted(t for kind, t in got if kind == "done")
    met = sum(t <= slo_s for t in ttfts)
    status = cluster.status()
    return {"admitted": len(ttfts), "rejected": sum(kind == "rejected" for kind, _ in got), "met": met,
            "goodput": met / span, "p50": statistics.median(ttfts) if ttfts else 0.0,
            "p90": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else 0.0, "max": ttfts[-1] if ttfts else 0.0,
            "ttft_error": status.get("ttft_observed_over_predicted", 0.0), "cost_model": status["cost_model"],
            "slowdown": {n: round(w.get("slowdown", 1.0), 2) for n, w in status["workers"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--trace", default=os.path.join(os.path.dirname(__file__), "../../shared/traces/"
                                                    "conversation_trace.jsonl"))
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--tokens-per-block", type=int, default=32, help="tokens per trace hash id")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply the trace's timestamps by this")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ttft-slo", type=float, default=5.0, help="seconds")
    ap.add_argument("--tbt-slo", type=float, default=1.0, help="seconds")
    ap.add_argument("--policy", default="mooncake")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--modes", default="off,on", help="correction off / on, in this order each run (a tree "
                    "without the correction, run by PYTHONPATH: off)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    import inspect

    import pdserve.cluster as cluster_module
    from model.engine import SamplingParams
    from pdserve.bench import trace_jobs
    from scheduler.policies import SLO

    has_option = "cost_correction" in inspect.signature(cluster_module.LocalCluster).parameters
    print(f"tree: {os.path.dirname(os.path.dirname(cluster_module.__file__))}")
    print(f"{machine()}; {args.model}, policy {args.policy}, TTFT SLO {args.ttft_slo:g} s, "
          f"{args.requests} trace rows x {args.time_scale:g} time, {args.tokens_per_block} tokens per hash id")
    for run in range(args.runs):
        for mode in args.modes.split(","):
            correct = mode == "on"
            option = {"cost_correction": correct} if has_option else {}
            with cluster_module.LocalCluster(args.model, num_cpus=2, policy=args.policy, **option,
                                             slo=SLO(ttft_s=args.ttft_slo, tbt_s=args.tbt_slo)) as cluster:
                vocab = cluster.model_config.vocab_size
                for prompt in random_prompts(4, 256, vocab, seed=run):
                    list(cluster.stream(cluster.submit(prompt, SamplingParams(max_tokens=4, ignore_eos=True))))
                jobs = trace_jobs(args.trace, args.requests, args.tokens_per_block, 100_000, args.max_tokens,
                                  args.time_scale, vocab)
                r = replay(cluster, jobs, args.ttft_slo)
            print(f"run {run} correction {mode:<3}: admitted {r['admitted']:>3}, rejected "
                  f"{r['rejected']:>3}, met SLO {r['met']:>3}, goodput {r['goodput']:.2f} req/s; TTFT of the "
                  f"admitted p50 {r['p50']:.1f} / p90 {r['p90']:.1f} / max {r['max']:.1f} s; Conductor "
                  f"({r['cost_model']}): TTFT observed / predicted {r['ttft_error']:.2f}, slowdown {r['slowdown']}",
                  flush=True)


if __name__ == "__main__":
    main()
