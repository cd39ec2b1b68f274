"""The device session's engine stages: the paged engine on a 13B-class model with random int8 weights.

Decode steps at batch x context against the bytes floor (eager and as CUDA graphs, with a profile),
prefill against the compute floor, and the largest batch whose KV fits (``benchmarks.gpu_session``
runs them; on CPU, its dry run uses ``skv-tiny``).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from benchmarks.gpu_session import Session


def _model(s: Session, preset: str):
    from model.config import QuantConfig
    from model.loader import load

    quant = QuantConfig(compute="bfloat16" if s.dev.type == "cuda" else "float32")
    return load(preset, quant=quant, device=s.dev, random_weights=True).model


def _weight_bytes(model) -> int:
    """Weight bytes a decode step reads: every matrix once; of the embedding table, only a row per token."""
    tensors = [b for name, b in model.named_buffers() if name.endswith("weight_q") and "embed" not in name]
    tensors += [p for name, p in model.named_parameters() if "embed" not in name]
    return sum(t.numel() * t.element_size() for t in tensors)


def _fill_random(engine) -> None:
    """Random int8 codes and small positive scales in every pool: never time on zeros."""
    pool = engine.pool
    torch.manual_seed(1234)  # the same contents in every engine of the session (graphs vs eager compare them)
    for group in range(len(pool.k)):
        for t in (pool.k[group], pool.v[group]):
            t.random_(-127, 128)
        for t in (pool.k_scale[group], pool.v_scale[group]):
            t.uniform_(0.005, 0.02)


def _decoding_engine(model, batch: int, context: int, kv_bytes: int, steps: int, graphs: str = "off"):
    """An engine holding ``batch`` sequences at ``context`` tokens, placed in the pool without a prefill
    (as benchmarks/decode_steps.py does): each following step is one decode token per sequence."""
    from model.engine import Engine, EngineConfig, SamplingParams
    from model.engine.sequence import Status

    cfg = model.config
    engine = Engine(model, EngineConfig(kv_cache_bytes=kv_bytes, max_seqs=batch, max_batched_tokens=max(batch, 64),
                                        decode_graphs=graphs))
    engine.eos_ids = set()
    _fill_random(engine)
    prompt = torch.randint(100, cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    sched, pool, bs = engine.scheduler, engine.pool, cfg.block_size
    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    for _ in range(batch):
        seq = engine.sequences[engine.add_request(prompt, params)]
        for g in cfg.kv_groups:  # the blocks a query at position context - 1 reads (and writes)
            first = 0 if g.window is None else max(0, context - g.window)
            lo, hi = first // bs, (context - 1) // bs
            if hi - lo + 1 > pool.num_free(g.index):
                raise MemoryError(f"the pool cannot hold {batch} sequences of {context} tokens (group {g.index})")
            seq.tables[g.index] = [-1] * lo + [pool.allocate(g.index) for _ in range(lo, hi + 1)]
        seq.computed = context - 1
        seq.status = Status.RUNNING
        sched.waiting.remove(seq)
        sched.running.append(seq)
    return engine


class _TimedForward:
    """The engine's model, each forward timed between device synchronizations: splits a step into
    the model's device work and the host's (scheduling, batch building, sampling)."""

    def __init__(self, model):
        self.model, self.times = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        _sync()
        t = time.perf_counter()
        out = self.model(*args, **kwargs)
        _sync()
        self.times.append(time.perf_counter() - t)
        return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _pool_bytes(cfg, batch: int, context: int) -> int:
    """A KV budget that holds ``batch`` sequences a few blocks past ``context`` under the allocator's split."""
    return 2 * batch * cfg.kv_bytes(context + 2 * cfg.block_size) + 2**26


def _step_ms(engine, steps: int) -> tuple[float, float | None]:
    """Median wall time of a whole engine step, and of its model forward alone (ms; None when the
    steps replayed CUDA graphs, which call no forward)."""
    engine.step()  # warm-up (and Triton compiles for this batch's shapes)
    timed = engine.model = _TimedForward(engine.model)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    engine.model = timed.model
    return 1e3 * statistics.median(times), 1e3 * statistics.median(timed.times) if timed.times else None


def _kv_read_bytes(cfg, batch: int, context: int) -> int:
    """KV one decode step reads: each group's held tokens (window-limited), int8 + scales."""
    per_token = cfg.kv_bytes_per_token_per_group
    return batch * sum(g.tokens_held(context) for g in cfg.kv_groups) * per_token


def stage_engine(s: Session) -> dict:
    """Decode and prefill of the 13B-class model, with the kernels' value checks off (each reads
    device tensors back to the host, a sync per call); one row with them on shows what they cost."""
    os.environ["PDSERVE_KERNEL_CHECKS"] = "0"
    try:
        return _engine_figures(s)
    finally:
        os.environ.pop("PDSERVE_KERNEL_CHECKS", None)


def _engine_figures(s: Session) -> dict:
    from benchmarks import gemm_tiles, graph_vs_eager

    p = s.plan
    model = _model(s, p.preset)
    cfg = model.config
    weights = _weight_bytes(model)
    hbm = s.results.get("device", {}).get("copy_gbs")
    peak_ops = s.results.get("device", {}).get("int_mm_tops")
    rows = []
    for context in p.engine_contexts:
        for batch in p.engine_batches:
            if s.left() < 40:
                rows.append({"batch": batch, "context": context, "skipped": "budget"})
                continue
            kv = _kv_read_bytes(cfg, batch, context)
            engine = _decoding_engine(model, batch, context, _pool_bytes(cfg, batch, context), p.steps)
            ms, forward_ms = _step_ms(engine, p.steps)
            floor_ms = 1e3 * (weights + kv) / (hbm * 1e9) if hbm else None
            rows.append({"batch": batch, "context": context, "step_ms": ms, "forward_ms": forward_ms,
                         "host_ms": ms - forward_ms, "tokens_per_s": batch / ms * 1e3,
                         "weights_gb": weights / 1e9, "kv_read_gb": kv / 1e9, "bytes_floor_ms": floor_ms,
                         "x_floor": ms / floor_ms if floor_ms else None,
                         "forward_x_floor": forward_ms / floor_ms if floor_ms else None})
            print(rows[-1], flush=True)
            del engine
            for prologue in ("fused", "torch"):  # the Triton rotate + quantize, then the torch butterflies (A/B)
                rows.append(_graph_row(s, model, batch, context, floor_ms, prologue))
            if s.results.get("tiles", {}).get("best"):  # and with the tile sweep's winners (A/B against the rule)
                rows.append(_graph_row(s, model, batch, context, floor_ms, "fused", s.results["tiles"]["best"]))
            if s.dev.type == "cuda":  # and with the tiles the rule gave before the sweep
                rows.append(_graph_row(s, model, batch, context, floor_ms, "fused",
                                       gemm_tiles.previous_rule((batch,), p.preset), "previous rule"))
    agreement = graph_vs_eager.agreement(s, model, _pool_bytes)
    divergence = graph_vs_eager.layer_divergence(model, _pool_bytes) if s.left() > 40 else None
    batch, context = p.engine_batches[-1], p.engine_contexts[-1]
    if s.left() > 40:
        os.environ["PDSERVE_KERNEL_CHECKS"] = "1"
        try:
            engine = _decoding_engine(model, batch, context, _pool_bytes(cfg, batch, context), p.steps)
            ms, forward_ms = _step_ms(engine, p.steps)
            rows.append({"batch": batch, "context": context, "value_checks": True, "step_ms": ms,
                         "forward_ms": forward_ms, "host_ms": ms - forward_ms})
            del engine
        except Exception as e:  # keep the rows above
            rows.append({"batch": batch, "context": context, "value_checks": True, "error": repr(e)})
        os.environ["PDSERVE_KERNEL_CHECKS"] = "0"
    try:
        profile = _profile(model, batch, context, p.steps) if s.left() > 40 else None
    except Exception as e:
        profile = {"error": repr(e)}
    prefill = []
    for n in p.engine_prefill:
        if s.left() < 40:
            break
        prefill.append(_prefill(s, model, n, weights, peak_ops))
        print(prefill[-1], flush=True)
    return {"preset": p.preset, "compute": cfg.quant.compute, "weights_gb": weights / 1e9, "decode": rows,
            "graph_agreement": agreement, "graph_divergence": divergence,
            "prefill": prefill, "profile": profile}


def _graph_row(s: Session, model, batch: int, context: int, floor_ms: float | None, prologue: str = "fused",
               tiles: list[dict] | None = None, tiles_label: str = "swept") -> dict:
    """The same decode step replayed as a CUDA graph (on CPU: the graphs' static path, uncaptured), with the
    int8 linears' rotate + quantize as one Triton kernel ("fused") or as the torch butterflies ("torch";
    the CPU dry run runs its C prologue either way), and the GEMMs on the rule's tiles or on ``tiles``
    (``benchmarks.gemm_tiles``' winners)."""
    from benchmarks import gemm_tiles
    from kernels import triton_gemm as tg

    mode = "auto" if s.dev.type == "cuda" else "eager"
    head = {"batch": batch, "context": context, "graphs": mode, "prologue": prologue,
            "tiles": tiles_label if tiles else "rule"}
    if prologue == "torch":
        os.environ["PDSERVE_TRITON_PROLOGUE"] = "off"
    gemm_tiles.use(tiles or [])
    try:
        engine = _decoding_engine(model, batch, context, _pool_bytes(model.config, batch, context), s.plan.steps, mode)
        ms, _ = _step_ms(engine, s.plan.steps)
    except Exception as e:  # recorded; the eager rows stand
        return {**head, "error": repr(e)[:2000]}
    finally:
        tg.TILES.clear()
        if prologue == "torch":
            os.environ.pop("PDSERVE_TRITON_PROLOGUE", None)
    row = {**head, "step_ms": ms, "tokens_per_s": batch / ms * 1e3, "x_floor": ms / floor_ms if floor_ms else None}
    print(row, flush=True)
    return row


def _profile(model, batch: int, context: int, steps: int) -> dict:
    """torch.profiler over a few decode steps: where a step's time goes, by device and by host time."""
    from torch.profiler import ProfilerActivity, profile

    engine = _decoding_engine(model, batch, context, _pool_bytes(model.config, batch, context), steps)
    engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            engine.step()
        _sync()
    avg = prof.key_averages()
    device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return {"batch": batch, "context": context, "steps": 3,
            "by_device_time": avg.table(sort_by=device_key, row_limit=20, max_name_column_width=60),
            "by_host_time": avg.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)}


def _prefill(s: Session, model, n: int, weights: int, peak_ops: float | None) -> dict:
    """One ``n``-token prompt through the engine in one chunk: tokens/s against the int8 GEMM floor."""
    from model.engine import Engine, EngineConfig, SamplingParams

    cfg = model.config
    engine = Engine(model, EngineConfig(kv_cache_bytes=cfg.kv_bytes(n + 2 * cfg.block_size) * 2 + 2**26,
                                        max_seqs=2, max_batched_tokens=n))
    prompt = torch.randint(100, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    times = []
    for i in range(1 + max(1, s.plan.steps // 2)):
        t = time.perf_counter()
        engine.generate([prompt], SamplingParams(max_tokens=1))
        if i:  # the first run compiles
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    # int8 GEMMs: every weight but the LM head (one row of logits) once per token, at the measured
    # torch._int_mm rate; causal attention in bf16 at the measured matmul rate
    gemm_ops = 2 * (weights - cfg.vocab_size * cfg.dim * (1 if cfg.quant.weights else 2)) * n
    attn_ops = sum(4 * cfg.n_heads * cfg.head_dim * sum(min(i + 1, spec.window or n) for i in range(0, n, 64)) * 64
                   for spec in cfg.layers)
    bf16 = s.results.get("device", {}).get("bf16_matmul_tflops")
    floor = gemm_ops / (peak_ops * 1e12) + attn_ops / (bf16 * 1e12) if peak_ops and bf16 else None
    return {"tokens": n, "seconds": sec, "tokens_per_s": n / sec, "gemm_tops_needed": gemm_ops / 1e12,
            "attention_tflops_needed": attn_ops / 1e12, "compute_floor_s": floor,
            "x_floor": sec / floor if floor else None}


def max_batch(cfg, kv_bytes: int, context: int) -> int:
    """The most sequences of ``context`` tokens (plus a block to grow into) that the engine's allocator
    holds in ``kv_bytes``: bisection over the batch, since local groups' shares depend on it."""
    from model.engine.block_pool import blocks_per_group

    def fits(batch: int) -> bool:
        counts = blocks_per_group(cfg, kv_bytes, batch, max(batch, 64))
        return all(c >= batch * cfg.kv_blocks(g, context + cfg.block_size) for g, c in zip(cfg.kv_groups, counts))

    lo, hi = 0, max(1, kv_bytes // cfg.kv_bytes(min(context, cfg.kv_groups[0].window or context)))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def stage_capacity(s: Session) -> dict:
    p = s.plan
    out = {}
    for preset in dict.fromkeys((p.preset, p.gqa_preset)):
        model = _model(s, preset)
        cfg = model.config
        if s.dev.type == "cuda":
            free = torch.cuda.mem_get_info(s.dev)[0] - p.headroom_bytes
        else:
            free = 64 * cfg.kv_bytes(max(p.capacity_contexts))  # the dry run: room for 64 long sequences
        rows = []
        for context in p.capacity_contexts:
            per_seq = cfg.kv_bytes(context + cfg.block_size)
            fit = max_batch(cfg, free, context)
            row = {"context": context, "kv_bytes_per_seq": per_seq, "kv_budget_gb": free / 1e9, "max_batch": fit}
            run = min(fit, p.capacity_step_cap)
            if run and s.left() > 60:
                engine = _decoding_engine(model, run, context, free, 2)
                step_ms, forward_ms = _step_ms(engine, 2)
                row.update(ran_batch=run, step_ms=step_ms, forward_ms=forward_ms)
                del engine
                if s.dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(preset, row, flush=True)
        out[preset] = rows
        del model
        if s.dev.type == "cuda":
            torch.cuda.empty_cache()
    if p.gqa_preset != p.preset:
        out["ratio"] = {c: out[p.preset][i]["max_batch"] / max(1, out[p.gqa_preset][i]["max_batch"])
                        for i, c in enumerate(p.capacity_contexts)}
    return out
