"""The same `pdserve bench` workload over gRPC and over the OpenAI HTTP edge, side by side.

    python -m benchmarks.http_vs_grpc [--model skv-tiny] [--runs 3] [--num-prompts 100] [--max-concurrency 16]
                                      [--input-len 64] [--max-tokens 16] [--json OUT]

Starts one `pdserve up` (127.0.0.1, free ports) and runs `pdserve bench --backend grpc` and `--backend
openai` alternately (so drift on a shared machine hits both alike), ``--runs`` times each, for two
workloads: "load" (all requests at once, the concurrency cap given) and "overhead" (one request at a
time, 1 output token: the HTTP edge's cost per request is the difference of the two E2E latencies).
Prints the median of each figure over the runs. Then "edge": both front doors in this process over an
instant stand-in cluster (no Ray, no model), the same one-token request sequentially over gRPC and
HTTP in alternating blocks: the transport's own cost per request, without the cluster's noise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIGURES = {"req/s": r"Request throughput \(req/s\):\s+([\d.]+)", "tok/s": r"Output token throughput \(tok/s\):\s+([\d.]+)",
           "TTFT p50": r"P50 TTFT \(ms\):\s+([\d.]+)", "TTFT p99": r"P99 TTFT \(ms\):\s+([\d.]+)",
           "TPOT p50": r"P50 TPOT \(ms\):\s+([\d.]+)", "TPOT p99": r"P99 TPOT \(ms\):\s+([\d.]+)",
           "E2E mean": r"Mean E2EL \(ms\):\s+([\d.]+)", "E2E p50": r"P50 E2EL \(ms\):\s+([\d.]+)",
           "failed": r"Failed requests:\s+(\d+)"}


def pdserve(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def bench(state: Path, backend: str, args: list[str]) -> dict[str, float]:
    out = pdserve("bench", "--state-file", str(state), "--backend", backend, *args)
    if out.returncode != 0:
        raise RuntimeError(f"bench {backend} failed:\n{out.stdout}\n{out.stderr[-2000:]}")
    return {k: float(re.search(p, out.stdout).group(1)) for k, p in FIGURES.items()}


class InstantCluster:
    """What the front door calls on a LocalCluster, answering at once: one token per request."""

    def __init__(self, model: str):
        from model.presets import get_preset

        self.model_config, self.tokenizer = get_preset(model), None

    def submit(self, prompt, params, session_id, rid, ttft, tbt, priority):
        from concurrent.futures import Future
        from types import SimpleNamespace

        done = Future()
        done.set_result(SimpleNamespace(cached_tokens=0, timings={}))
        return SimpleNamespace(request_id=rid, handoff=done)

    def stream(self, sub):
        from model.engine import RequestOutput

        yield RequestOutput(sub.request_id, [40], finished=True, finish_reason="length")

    def cancel(self, rid) -> None:
        pass


def edge_cost(model: str, blocks: int, per_block: int) -> dict[str, float]:
    """Median E2E (ms) of a one-token request over each transport, the cluster answering at once."""
    import asyncio
    import threading

    from pdserve.bench import Job, run_one
    from pdserve.bench_http import OpenAIClient
    from pdserve.client import Client
    from pdserve.frontdoor import ServerOptions
    from pdserve.gateway import start
    from pdserve.http_edge import start_http
    from pdserve.metrics import Metrics

    box, ready = {}, threading.Event()

    async def serve() -> None:
        running = await start(InstantCluster(model), ServerOptions(), Metrics(model))
        http = await start_http(running.gateway.door, running.gateway.door.opts, 0)
        box.update(grpc=running.port, http=http.port)
        ready.set()
        while not box.get("stop"):
            await asyncio.sleep(0.05)
        await http.stop()
        await running.stop(0)

    t = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    t.start()
    ready.wait(60)
    g = Client(f"127.0.0.1:{box['grpc']}")
    h = OpenAIClient(f"http://127.0.0.1:{box['http']}", model=model)
    job, lat = Job(0, list(range(3, 67)), 1), {"grpc": [], "openai": []}
    for _ in range(blocks):
        for backend, one in (("grpc", lambda: run_one(g, job, 30)), ("openai", lambda: h.run_job(job, 30))):
            lat[backend] += [one().e2e * 1e3 for _ in range(per_block)]
    box["stop"] = True
    t.join(30)
    return {b: statistics.median(xs) for b, xs in lat.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="skv-tiny")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--overhead-prompts", type=int, default=40)
    ap.add_argument("--workloads", default="load,overhead")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    workloads = {
        "load": ["--num-prompts", str(a.num_prompts), "--max-concurrency", str(a.max_concurrency), "--input-len",
                 str(a.input_len), "--max-tokens", str(a.max_tokens)],
        "overhead": ["--num-prompts", str(a.overhead_prompts), "--max-concurrency", "1", "--input-len",
                     str(a.input_len), "--max-tokens", "1"],
    }
    workloads = {w: workloads[w] for w in a.workloads.split(",")}
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as d:
        state = Path(d) / "server.json"
        up = pdserve("up", "--model", a.model, "--port", "0", "--http-port", "0", "--state-file", str(state))
        if up.returncode != 0:
            raise SystemExit(up.stdout + up.stderr)
        try:
            results = {w: {"grpc": [], "openai": []} for w in workloads}
            for w, args in workloads.items():
                bench(state, "grpc", args)  # warm-up, not counted
                for _ in range(a.runs):
                    for backend in ("grpc", "openai"):
                        results[w][backend].append(bench(state, backend, args))
        finally:
            pdserve("down", "--state-file", str(state))
    print(f"{a.model}, {time.strftime('%Y-%m-%d')}, median of {a.runs} runs each")
    for w, by in results.items():
        print(f"\n{w}: {' '.join(workloads[w])}")
        print(f"{'':<10}" + "".join(f"{k:>11}" for k in FIGURES))
        for backend, runs in by.items():
            print(f"{backend:<10}" + "".join(f"{statistics.median(r[k] for r in runs):>11.2f}" for k in FIGURES))
    if "overhead" in results:
        e2e = {b: statistics.median(r["E2E mean"] for r in results["overhead"][b]) for b in ("grpc", "openai")}
        print(f"\nHTTP edge overhead per request (1 token, one at a time): {e2e['openai'] - e2e['grpc']:+.2f} ms "
              f"(E2E {e2e['grpc']:.2f} ms gRPC, {e2e['openai']:.2f} ms HTTP)")
    edge = edge_cost(a.model, 5, 100)
    print(f"edge only (instant stand-in cluster, 500 one-token requests each): gRPC {edge['grpc']:.2f} ms, "
          f"HTTP {edge['openai']:.2f} ms, HTTP - gRPC {edge['openai'] - edge['grpc']:+.2f} ms per request")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": results, "edge_ms": edge}, indent=1))


if __name__ == "__main__":
    main()
