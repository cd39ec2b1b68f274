"""How long a decode worker makes other threads wait for its engine lock while it decodes: a thread
calls ``load()`` (what the supervisor's ping runs) every 10 ms while the worker decodes a batch, with
the worker's fair lock and with a plain ``threading.RLock`` (what it had before), in the same run.

    python -m benchmarks.decode_lock [--requests 4] [--prompt 150] [--max-tokens 300] [--runs 3]

Prints, per lock, the decode time and the ping wait's median / p90 / worst (medians over the runs).
skv-tiny with random weights, one torch thread: the engine loop's steps are a few milliseconds, the
case where a plain lock is won back by the loop most often.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time


def one_run(lock_kind: str, model, store, fp, handoffs, params) -> dict:
    from benchmarks.common import decode_handoffs
    from decode.worker import DecodeWorker
    from model.engine import EngineConfig

    worker = DecodeWorker("d", model, store, fp, EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=8), publish=False)
    if lock_kind == "plain":
        worker.lock = threading.RLock()
    waits, stop = [], threading.Event()

    def ping():
        while not stop.is_set():
            t = time.perf_counter()
            worker.load()
            waits.append(time.perf_counter() - t)
            time.sleep(0.01)

    pinger = threading.Thread(target=ping)
    pinger.start()
    elapsed = decode_handoffs(worker, handoffs, params)
    stop.set()
    pinger.join()
    worker.shutdown()
    waits.sort()
    return {"decode_s": elapsed, "median_ms": 1e3 * statistics.median(waits),
            "p90_ms": 1e3 * waits[int(0.9 * (len(waits) - 1))], "max_ms": 1e3 * waits[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import torch

    from benchmarks.common import in_process_prefill
    from model.engine import EngineConfig, SamplingParams
    from model.loader import build, random_state
    from model.presets import get_preset

    torch.set_num_threads(1)
    cfg = get_preset("skv-tiny")
    model = build(cfg, random_state(cfg, 0))
    store, prefill, fp = in_process_prefill(model, EngineConfig(kv_cache_bytes=16 * 2**20, max_seqs=8))
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    results: dict[str, list[dict]] = {"fair": [], "plain": []}
    for run in range(args.runs):
        for kind in ("plain", "fair") if run % 2 else ("fair", "plain"):  # alternate which goes first
            prompts = [[(run * 31 + i * 7 + j) % 200 + 1 for j in range(args.prompt)] for i in range(args.requests)]
            handoffs = [prefill.prefill(f"{kind}-{run}-{i}", p, params) for i, p in enumerate(prompts)]
            results[kind].append(one_run(kind, model, store, fp, handoffs, params))
            print(f"run {run + 1}/{args.runs} {kind:5s} " + "  ".join(f"{k} {v:.2f}" for k, v in results[kind][-1].items()),
                  flush=True)
    print(f"\n{args.requests} requests x ({args.prompt} -> {args.max_tokens}), medians of {args.runs} runs:")
    print(f"{'lock':6s} {'decode s':>9s} {'ping median ms':>15s} {'p90 ms':>8s} {'worst ms':>9s}")
    med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in results.items()}
    for kind, m in med.items():
        print(f"{kind:6s} {m['decode_s']:9.2f} {m['median_ms']:15.2f} {m['p90_ms']:8.2f} {m['max_ms']:9.1f}")
    print(f"fair / plain: decode time {med['fair']['decode_s'] / med['plain']['decode_s']:.2f}x, "
          f"ping p90 {med['fair']['p90_ms'] / med['plain']['p90_ms']:.2f}x, worst {med['fair']['max_ms'] / med['plain']['max_ms']:.2f}x")


if __name__ == "__main__":
    main()
