"""The whole serving path against the engine alone: `pdserve bench` through the gRPC gateway vs
the single-process engine, the same requests, in one run (issue 15: the cluster adds little).

    python -m benchmarks.gateway_vs_engine [--model smollm2-135m] [--num-prompts 100]
        [--max-concurrency 32] [--input-len 128] [--max-tokens 32] [--runs 3] [--json OUT] [--cpu-split]

Starts one `pdserve up` (127.0.0.1, free port; prefill worker, store, decode worker on a local Ray
cluster) and, alternately, `pdserve bench` through its gateway and the engine of this process on
the same prompts (``pdserve.bench.poisson_jobs``, same seed; all at once, at most
``--max-concurrency`` in flight / held by the engine at a time). EOS is ignored by neither: both
are greedy on random in-vocabulary tokens, so an early stop is possible on both sides alike;
generated tokens are counted, not assumed. Prints medians of ``--runs`` and the ratio of output
token throughput, cluster / engine. ``--cpu-split``: where the cluster's CPU time went during its runs,
per process kind (``benchmarks.cpu_split``). The engine alone has every core; the cluster splits them
among its workers, which is what a user of one machine gets.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine
from benchmarks.cpu_split import CpuSplit
from benchmarks.http_vs_grpc import bench, pdserve


def engine_run(model, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict[str, float]:
    """The prompts through one in-process engine, ``concurrency`` sequences at most: req/s, tok/s, wall."""
    from model.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(model, EngineConfig(max_seqs=concurrency, max_batched_tokens=2048))
    params = SamplingParams(max_tokens=max_tokens)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    generated = 0
    while engine.has_work():
        generated += sum(len(out.token_ids) for out in engine.step())
    wall = time.perf_counter() - t0
    return {"req/s": len(prompts) / wall, "tok/s": generated / wall, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--max-concurrency", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-split", action="store_true", help="CPU seconds per process kind in the cluster runs")
    a = ap.parse_args()
    from model.loader import load
    from pdserve.bench import poisson_jobs
    from pdserve.server import ServerState

    loaded = load(a.model)
    jobs = poisson_jobs(a.num_prompts, float("inf"), a.input_len, a.max_tokens, loaded.model.config.vocab_size, a.seed)
    bench_args = ["--num-prompts", str(a.num_prompts), "--max-concurrency", str(a.max_concurrency),
                  "--input-len", str(a.input_len), "--max-tokens", str(a.max_tokens), "--seed", str(a.seed)]
    results: dict[str, list[dict]] = {"cluster": [], "engine": []}
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as d:
        state = Path(d) / "server.json"
        up = pdserve("up", "--model", a.model, "--port", "0", "--state-file", str(state))
        if up.returncode != 0:
            raise SystemExit(up.stdout + up.stderr)
        split, cluster_wall = CpuSplit(ServerState.load(state).pid), 0.0
        try:
            bench(state, "grpc", ["--num-prompts", "4", "--max-concurrency", "4", "--input-len", str(a.input_len),
                                  "--max-tokens", "4"])  # warm-up, not counted
            for _ in range(a.runs):
                t0 = time.perf_counter()
                split.start()
                results["cluster"].append(bench(state, "grpc", bench_args))
                split.stop()
                cluster_wall += time.perf_counter() - t0
                results["engine"].append(engine_run(loaded.model, [j.prompt for j in jobs], a.max_tokens,
                                                    a.max_concurrency))
        finally:
            pdserve("down", "--state-file", str(state))
    med = {side: {k: statistics.median(r[k] for r in runs) for k in ("req/s", "tok/s")}
           for side, runs in results.items()}
    print(f"{machine()}, {a.model}, {time.strftime('%Y-%m-%d %H:%M')}, {a.num_prompts} requests of "
          f"{a.input_len} -> {a.max_tokens} tokens, {a.max_concurrency} at a time, median of {a.runs} alternated runs")
    print(f"{'':<28}{'req/s':>9}{'tok/s':>9}")
    print(f"{'cluster (pdserve bench, gRPC)':<28}{med['cluster']['req/s']:>9.2f}{med['cluster']['tok/s']:>9.2f}")
    print(f"{'engine alone (this process)':<28}{med['engine']['req/s']:>9.2f}{med['engine']['tok/s']:>9.2f}")
    if results["cluster"]:
        tpot = statistics.median(r["TPOT p50"] for r in results["cluster"])
        print(f"cluster TPOT p50 {tpot:.0f} ms, failed requests {max(r['failed'] for r in results['cluster']):.0f}")
    print(f"cluster / engine (output tok/s; issue 15's goal >= 0.8): {med['cluster']['tok/s'] / med['engine']['tok/s']:.2f}")
    if a.cpu_split:
        print(f"CPU time of the cluster runs ({cluster_wall:.1f} s of wall time in all):")
        print(split.table(cluster_wall))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
