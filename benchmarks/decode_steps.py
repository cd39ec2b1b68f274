"""Decode step time against batch size and context: the data the scheduler's cost model is fitted to.

    python -m benchmarks.decode_steps [--model smollm2-135m] [--batches 1,8,32,64] [--contexts 256,1024,4096] [--json]

Sequences are placed in the pool at the given context without running their prefill (the
bytes are whatever the pool holds: step time does not depend on their values), then a few
decode steps are timed; the figure is the median step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.common import machine, random_prompts
from model.engine import Engine, EngineConfig, SamplingParams
from model.engine.sequence import Status


def placed_engine(model, batch: int, context: int, steps: int = 5) -> Engine:
    """``batch`` sequences at ``context`` tokens, placed without their prefill, after one warm-up step."""
    cfg = model.config
    need = batch * (context + 2 * steps + 2 * cfg.block_size) * cfg.kv_bytes_per_token_per_group * len(cfg.kv_groups)
    engine = Engine(model, EngineConfig(kv_cache_bytes=need + 2**26, max_seqs=batch, max_batched_tokens=batch))
    engine.eos_ids = set()
    sched = engine.scheduler
    for prompt in random_prompts(batch, context, cfg.vocab_size):
        seq = engine.sequences[engine.add_request(prompt, SamplingParams(max_tokens=2 * steps + 4))]
        if not sched._reserve(seq, context - 1):
            raise MemoryError("pool too small for the grid point")
        seq.computed = context - 1
        seq.status = Status.RUNNING
        sched.waiting.remove(seq)
        sched.running.append(seq)
    engine.step()  # warm-up
    return engine


def step_time(model, batch: int, context: int, steps: int = 5) -> float:
    engine = placed_engine(model, batch, context, steps)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from model.loader import load

    model = load(args.model).model
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    rows = [{"batch": b, "context": c, "step_ms": 1e3 * step_time(model, b, c)} for c in contexts for b in batches]
    if args.json:
        print(json.dumps({"machine": machine(), "model": args.model, "rows": rows}, indent=1))
        return
    print(f"{args.model} ({model.config.quant.tag}) on {machine()}")
    print("context \\ batch " + "".join(f"{b:>10}" for b in batches))
    for c in contexts:
        ms = [r["step_ms"] for r in rows if r["context"] == c]
        print(f"{c:>15} " + "".join(f"{m:>8.1f}ms" for m in ms))
    print("aggregate decode tok/s:")
    for c in contexts:
        print(f"{c:>15} " + "".join(f"{b / r['step_ms'] * 1e3:>10.0f}" for b, r in
                                     zip(batches, [r for r in rows if r["context"] == c])))


if __name__ == "__main__":
    main()
