"""Where an engine step's time goes: torch.profiler over prefill and decode steps of SmolLM2 int8.

    python -m benchmarks.profile_steps [--batches 1,8,32] [--contexts 512,2048] [--steps 5] [--top 8]

For each (batch, context): decode steps with ``batch`` sequences at ``context`` tokens, and
the prefill of ``batch`` prompts of ``context`` tokens (one step each, ``max_batched_tokens``
large enough). The time of each step splits into the linear layers' GEMMs (``aten::mm`` /
``aten::_int_mm``), attention's batched matmuls (``aten::bmm``) or the C attention
(``kernels.cpu_attention``, its profiler scope's self time), every other op (casts, the C prologue,
quantize, rotation butterflies, index, copies), and time outside any op (Python): an unprofiled
run's step time minus the profiled run's op times, a lower bound (the profiler inflates op
times). The top ops by self time follow each row with ``--top``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from torch.profiler import ProfilerActivity, profile

from benchmarks.common import machine, random_prompts
from benchmarks.decode_steps import placed_engine
from model.engine import Engine, EngineConfig, SamplingParams

GEMM_OPS = {"aten::mm", "aten::_int_mm", "aten::addmm", "pdserve::int8_gemm_c",  # the C routes: their scopes
            "pdserve::int8_gemm_panels_c", "pdserve::int8_linear_c",  # the last with its prologue (few rows)
            "onednn::qlinear_pointwise", "pdserve::onednn_int_mm"}  # oneDNN's matmul on prepacked weights
ATTENTION_OPS = {"aten::bmm", "pdserve::attention_c"}  # the C attention: its scope's self time


def prefill_engine(model, batch: int, context: int) -> Engine:
    cfg = model.config
    need = batch * (context + 2 * cfg.block_size) * cfg.kv_bytes_per_token_per_group * len(cfg.kv_groups)
    engine = Engine(model, EngineConfig(kv_cache_bytes=need + 2**26, max_seqs=batch,
                                        max_batched_tokens=batch * context))
    for prompt in random_prompts(batch, context, cfg.vocab_size):
        engine.add_request(prompt, SamplingParams(max_tokens=1))
    return engine


def _split(prof, wall_ms: float, steps: int, top: int) -> dict:
    events = prof.key_averages()
    self_ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in events}
    gemm = sum(v for k, v in self_ms.items() if k in GEMM_OPS)
    attention = sum(v for k, v in self_ms.items() if k in ATTENTION_OPS)
    ops = sum(self_ms.values())
    calls = sum(e.count for e in events) / steps
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {"step_ms": wall_ms, "gemm_ms": gemm, "attention_ms": attention, "other_ops_ms": ops - gemm - attention,
            "outside_ops_ms": max(0.0, wall_ms - ops), "op_calls": calls,
            "top": [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in ranked]}


def profile_decode(model, batch: int, context: int, steps: int, top: int) -> dict:
    engine = placed_engine(model, batch, context, steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    return _split(prof, wall, steps, top)


def profile_prefill(model, batch: int, context: int, top: int) -> dict:
    prefill_engine(model, batch, context).step()  # warm-up at this shape
    engine = prefill_engine(model, batch, context)
    t0 = time.perf_counter()
    engine.step()
    wall = (time.perf_counter() - t0) * 1e3
    engine = prefill_engine(model, batch, context)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    return _split(prof, wall, 1, top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=0)
    parser.add_argument("--phases", default="decode,prefill")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from kernels import gemm_plan
    from model.loader import load

    model = load(args.model).model
    rows = []
    for phase in args.phases.split(","):
        for context in (int(c) for c in args.contexts.split(",")):
            for batch in (int(b) for b in args.batches.split(",")):
                r = (profile_decode(model, batch, context, args.steps, args.top) if phase == "decode"
                     else profile_prefill(model, batch, context, args.top))
                rows.append({"phase": phase, "batch": batch, "context": context, **r})
                print(f"  {phase} b{batch} ctx{context}: {r['step_ms']:.1f} ms", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"machine": machine(), "int8_gemm": gemm_plan.plan().describe(), "rows": rows}, indent=1))
        return
    print(machine())
    print(gemm_plan.plan().describe())
    print("| phase | batch | context | step ms | linear GEMMs ms | attention ms | other ops ms "
          "| outside ops (Python) ms | op calls |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['phase']} | {r['batch']} | {r['context']} | {r['step_ms']:.1f} | {r['gemm_ms']:.1f} | "
              f"{r['attention_ms']:.1f} | {r['other_ops_ms']:.1f} | {r['outside_ops_ms']:.1f} | {r['op_calls']:,.0f} |")
        for name, ms, count in r["top"]:
            print(f"|  | | | | {name} | {ms:.2f} ms | x{count} | | |")


if __name__ == "__main__":
    main()
