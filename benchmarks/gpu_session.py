"""One prepared device session: everything a lent GPU should measure, in one call, within a budget.

    python -m benchmarks.gpu_session --budget-s 420 --out "$OUT"      # on an H100 / H200
    python -m benchmarks.gpu_session --dry-run --out /tmp/gs           # on CPU: the plumbing, tiny shapes

GPUs are lent to few tasks, for minutes (issue 18), so nothing here may need debugging on the
device: every stage runs in a dry run on CPU first (CI does), a stage that fails is recorded
with its error and the session goes on, and the JSON is rewritten after every stage so that a
run cut off at its limit still returns what it measured. Stages, in order:

1. ``device``: name, versions, and the two ceilings measured here (device-to-device copy GB/s,
   8192^3 bf16 matmul TFLOP/s) plus ``torch._int_mm`` TOPS.
2. ``kernel_tests``: tests/test_kernels_triton.py on the device (the interpreter's tests, with
   CUDA tensors), then ``benchmarks.kernels``' correctness checks at the model's shapes.
3. ``kernels``: W8A8 GEMM vs bf16 matmul, paged decode attention vs the HBM floor, prefill
   attention and KV write (``benchmarks.kernels``), on ``cai-13b-skv`` shapes.
4. ``engine``: the paged engine on ``cai-13b-skv`` with random int8 weights (bf16 compute):
   decode step time at batch x context against the bytes floor (weights + KV read once per
   step, at the measured copy bandwidth), and prefill tokens/s against the int8 compute floor.
5. ``capacity``: the largest batch whose KV fits at 8k and 32k context, from the engine's own
   allocator with the memory left after the weights, for ``cai-13b-skv`` and ``cai-13b-gqa8``
   (int8 KV both, so the ratio is what the KV layout buys), each checked by running decode
   steps at that batch.
6. ``distill``: not run here: it needs the SmolLM2 GGUF (98 MB) carried in two calls; recorded
   as skipped.

Writes ``gpu_session.json`` (every figure) and ``gpu_session.txt`` (the short table, also
printed last) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


class Skipped(Exception):
    """A stage that cannot run in this session, with the reason (recorded as ``skipped``)."""


@dataclass
class Plan:
    """What each stage runs: the device plan, or tiny shapes on CPU for the dry run."""

    dry_run: bool
    preset: str = "cai-13b-skv"
    gqa_preset: str = "cai-13b-gqa8"
    gemm_m: tuple[int, ...] = (1, 32, 256, 512, 2048, 8192)
    decode_batches: tuple[int, ...] = (1, 32, 128)
    decode_contexts: tuple[int, ...] = (1024, 8192, 32768)
    prefill_cases: tuple[tuple[int, int], ...] = ((0, 2048), (0, 8192), (6144, 2048))
    write_tokens: tuple[int, ...] = (256, 8192)
    engine_batches: tuple[int, ...] = (1, 32, 128)
    engine_contexts: tuple[int, ...] = (1024, 8192)
    engine_prefill: tuple[int, ...] = (2048, 8192)
    capacity_contexts: tuple[int, ...] = (8192, 32704)  # 32k less a block: room to decode
    capacity_step_cap: int = 4096  # decode steps are run at the fitted batch up to this many sequences
    headroom_bytes: int = 12 * 2**30  # activations of a step at the largest batch, and the allocator's slack
    steps: int = 5
    test_args: tuple[str, ...] = ("-m", "not slow")

    @classmethod
    def tiny(cls) -> "Plan":
        return cls(dry_run=True, preset="skv-tiny", gqa_preset="skv-tiny", gemm_m=(1, 32), decode_batches=(2,),
                   decode_contexts=(48,), prefill_cases=((0, 32), (16, 16)), write_tokens=(32,),
                   engine_batches=(1, 4), engine_contexts=(40,), engine_prefill=(64,), capacity_contexts=(64, 256),
                   capacity_step_cap=64, headroom_bytes=0, steps=2, test_args=("-k", "quantize_rows"))


@dataclass
class Session:
    plan: Plan
    out: Path
    deadline: float
    results: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, stage, min_s: float) -> None:
        """Run one stage unless too little budget is left; record its figures or its error, then save."""
        if self.left() < min_s:
            self.results[name] = {"status": "skipped", "why": f"{self.left():.0f} s of budget left, needs ~{min_s:.0f}"}
        else:
            t0 = time.monotonic()
            print(f"\n== {name} ({self.left():.0f} s of budget left)", flush=True)
            try:
                figures = stage(self)
                self.results[name] = {"status": "ok", **figures}
            except Skipped as e:
                self.results[name] = {"status": "skipped", "why": str(e)}
            except Exception as e:  # recorded, and the session goes on to the next stage
                self.results[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()[-4000:]}
                print(self.results[name]["traceback"], flush=True)
            self.results[name]["seconds"] = round(time.monotonic() - t0, 1)
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        self.save()

    @property
    def dev(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() and not self.plan.dry_run else "cpu")

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_session.json").write_text(json.dumps(self.results, indent=1, default=str))


# -- stage 1: the device and its ceilings --------------------------------------------------------------
def stage_device(s: Session) -> dict:
    from benchmarks.common import machine
    from benchmarks.kernels import bench, peaks

    dev = s.dev
    info = {"host": machine(), "torch": torch.__version__, "dry_run": s.plan.dry_run}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev.type != "cuda":
        info["device"] = "cpu (dry run)"
        return info
    props = torch.cuda.get_device_properties(dev)
    info.update(device=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                cuda=torch.version.cuda, datasheet=peaks(props.name))
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)  # 1 GiB: many times the L2
    dst = torch.empty_like(src)
    info["copy_gbs"] = 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e9  # bytes read + written
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    info["bf16_matmul_tflops"] = 2 * 8192**3 / bench(lambda: a @ b) / 1e12
    a8 = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device=dev)
    b8 = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device=dev)
    info["int_mm_tops"] = 2 * 8192**3 / bench(lambda: torch._int_mm(a8, b8.t())) / 1e12
    return info


# -- stage 2: the kernel tests on the device -------------------------------------------------------------
def stage_kernel_tests(s: Session) -> dict:
    env = dict(os.environ, PDSERVE_TEST_DEVICE=s.dev.type)
    if s.dev.type == "cuda":
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_triton.py",
           *s.plan.test_args]
    timeout = max(30.0, min(240.0, s.left() - 60))
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        tail, rc = (done.stdout + done.stderr)[-3000:], done.returncode
    except subprocess.TimeoutExpired as e:
        tail, rc = f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-2000:]!r}", -1
    summary = next((ln for ln in reversed(tail.splitlines()) if " passed" in ln or " failed" in ln), tail[-300:])
    print(summary, flush=True)
    figures = {"pytest_rc": rc, "pytest_summary": summary.strip(), "pytest_tail": tail if rc else ""}
    if s.dev.type == "cuda":
        from benchmarks.kernels import check_correctness

        figures["model_shape_failures"] = check_correctness(s.dev)
        figures["quantize_vs_cpu_reference"] = _quantize_vs_cpu(s.dev)
    if rc != 0:
        raise RuntimeError(f"kernel tests on {s.dev.type}: {summary.strip()}")
    return figures


def _quantize_vs_cpu(dev: torch.device) -> dict:
    """Rows whose int8 codes differ from the CPU reference: the Triton kernel's, and torch's own on the GPU
    (torch divides by a scalar on CUDA through its reciprocal, which rounds differently)."""
    from kernels import reference
    from kernels import triton_gemm as tg

    x = torch.randn(300, 5120, generator=torch.Generator().manual_seed(7)) * 5
    want_q, want_s = reference.quantize_rows(x)
    got_q, got_s = tg.quantize_rows(x.to(dev))
    torch_q, torch_s = reference.quantize_rows(x.to(dev))
    return {"triton_code_mismatches": int((got_q.cpu() != want_q).sum()),
            "triton_scale_mismatches": int((got_s.cpu() != want_s).sum()),
            "torch_cuda_code_mismatches": int((torch_q.cpu() != want_q).sum()),
            "torch_cuda_scale_mismatches": int((torch_s.cpu() != want_s).sum())}


# -- stage 3: kernel benchmarks --------------------------------------------------------------------------
def stage_kernels(s: Session) -> dict:
    from benchmarks import kernels as kb

    p, dev = s.plan, s.dev
    pk = kb.peaks(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    hbm = s.results.get("device", {}).get("copy_gbs")
    os.environ["PDSERVE_KERNEL_CHECKS"] = "0"  # value checks sync the host: keep them out of the timings
    try:
        gemm = kb.bench_gemm(dev, pk, p.gemm_m, p.preset)
        decode = kb.bench_decode(dev, pk, p.decode_batches, p.decode_contexts, p.preset, hbm_gbs=hbm)
        other = kb.bench_prefill_and_write(dev, pk, p.preset, p.prefill_cases, p.write_tokens)
    finally:
        os.environ.pop("PDSERVE_KERNEL_CHECKS", None)
    return {"gemm": gemm, "decode": decode, "prefill_and_write": other, "goals": kb.goals(gemm, decode),
            "hbm_reference": "measured copy" if hbm else "datasheet"}


# -- stages 4 and 5: the engine on the 13B-class model ---------------------------------------------------
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
    p = s.plan
    os.environ["PDSERVE_KERNEL_CHECKS"] = "0"
    try:
        return _engine_figures(s)
    finally:
        os.environ.pop("PDSERVE_KERNEL_CHECKS", None)


def _engine_figures(s: Session) -> dict:
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
            rows.append(_graph_row(s, model, batch, context, floor_ms))
    agreement = _graph_agreement(s, model)
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
            "graph_agreement": agreement,
            "prefill": prefill, "profile": profile}


def _graph_row(s: Session, model, batch: int, context: int, floor_ms: float | None) -> dict:
    """The same decode step replayed as a CUDA graph (on CPU: the graphs' static path, uncaptured)."""
    mode = "auto" if s.dev.type == "cuda" else "eager"
    try:
        engine = _decoding_engine(model, batch, context, _pool_bytes(model.config, batch, context), s.plan.steps, mode)
        ms, _ = _step_ms(engine, s.plan.steps)
    except Exception as e:  # recorded; the eager rows stand
        return {"batch": batch, "context": context, "graphs": mode, "error": repr(e)[:2000]}
    row = {"batch": batch, "context": context, "graphs": mode, "step_ms": ms, "tokens_per_s": batch / ms * 1e3,
           "x_floor": ms / floor_ms if floor_ms else None}
    print(row, flush=True)
    return row


def _graph_agreement(s: Session, model, batch: int = 8, context: int = 1000, steps: int = 8) -> dict:
    """Greedy tokens of the same requests (prefilled, then decoded), with decode steps replayed as graphs
    and run eagerly: the fraction that agree (on a GPU not bit for bit: a graph's tables are padded
    wider, so attention splits its sums differently)."""
    from model.engine import Engine, EngineConfig, SamplingParams

    cfg = model.config
    prompts = torch.randint(100, cfg.vocab_size, (batch, context), generator=torch.Generator().manual_seed(2)).tolist()
    mode = "auto" if s.dev.type == "cuda" else "eager"
    got = {}
    try:
        for graphs in ("off", mode):
            engine = Engine(model, EngineConfig(kv_cache_bytes=_pool_bytes(cfg, batch, context + steps),
                                                max_seqs=batch, max_batched_tokens=2048, decode_graphs=graphs))
            got[graphs] = engine.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True))
    except Exception as e:
        return {"error": repr(e)[:2000]}
    pairs = [(a, b) for x, y in zip(got["off"], got[mode]) for a, b in zip(x, y)]
    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(got["off"], got[mode])]
    return {"tokens": len(pairs), "agree": sum(a == b for a, b in pairs) / max(1, len(pairs)),
            "identical_sequences": sum(x == y for x, y in zip(got["off"], got[mode])), "sequences": batch,
            "first_difference": first}


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


def stage_distill(s: Session) -> dict:
    raise Skipped("the distillation continuation needs the SmolLM2 GGUF on the device (98 MB, carried in two "
                  "halves over two calls); this session does not carry it: not built yet")


# -- the table --------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    lines = ["# pdserve device session"]
    d = results.get("device", {})
    lines.append(f"device: {d.get('device')}  torch {d.get('torch')}  triton {d.get('triton')}  "
                 f"copy {d.get('copy_gbs', 0):.0f} GB/s  bf16 {d.get('bf16_matmul_tflops', 0):.0f} TFLOP/s  "
                 f"int_mm {d.get('int_mm_tops', 0):.0f} TOPS")
    for name, r in results.items():
        lines.append(f"- {name}: {r.get('status')} ({r.get('seconds', 0)} s)"
                     + (f": {r.get('error') or r.get('why')}" if r.get("status") != "ok" else ""))
    kt = results.get("kernel_tests", {})
    if kt.get("pytest_summary"):
        lines.append(f"kernel tests: {kt['pytest_summary']}; model-shape failures: {kt.get('model_shape_failures')}")
    for g in results.get("kernels", {}).get("goals", []):
        lines.append(f"goal: {g}")
    for r in results.get("engine", {}).get("decode", []):
        if r.get("graphs") and "step_ms" in r:
            floor = f"{r['x_floor']:.2f}x floor" if r.get("x_floor") else "no floor"
            lines.append(f"engine decode b={r['batch']} ctx={r['context']} as a CUDA graph ({r['graphs']}): "
                         f"{r['step_ms']:.2f} ms/step, {r['tokens_per_s']:.0f} tok/s, {floor}")
        elif r.get("graphs"):
            lines.append(f"engine decode b={r['batch']} ctx={r['context']} as a CUDA graph: {r.get('error', '')[:300]}")
        elif r.get("value_checks") and "step_ms" in r:
            lines.append(f"engine decode b={r['batch']} ctx={r['context']} with kernel value checks on: "
                         f"{r['step_ms']:.2f} ms/step (forward {r['forward_ms']:.2f})")
        elif "step_ms" in r:
            floor = f"{r['x_floor']:.2f}x floor" if r.get("x_floor") else "no floor"
            lines.append(f"engine decode b={r['batch']} ctx={r['context']}: {r['step_ms']:.2f} ms/step "
                         f"(forward {r['forward_ms']:.2f}), {r['tokens_per_s']:.0f} tok/s, {floor}")
    if results.get("engine", {}).get("graph_agreement"):
        lines.append(f"graphs vs eager greedy tokens: {results['engine']['graph_agreement']}")
    for r in results.get("engine", {}).get("prefill", []):
        floor = f"{r['x_floor']:.2f}x floor" if r.get("x_floor") else "no floor"
        lines.append(f"engine prefill {r['tokens']} tok: {r['tokens_per_s']:.0f} tok/s, {floor}")
    cap = results.get("capacity", {})
    for preset, rows in cap.items():
        if isinstance(rows, list):
            for r in rows:
                lines.append(f"capacity {preset} ctx={r['context']}: max batch {r['max_batch']}"
                             + (f" (ran {r['ran_batch']}: {r['step_ms']:.1f} ms/step)" if "step_ms" in r else ""))
    if "ratio" in cap:
        lines.append(f"capacity ratio skv/gqa8: {cap['ratio']}")
    return "\n".join(lines)


STAGES = (("device", stage_device, 20), ("kernel_tests", stage_kernel_tests, 60), ("kernels", stage_kernels, 60),
          ("engine", stage_engine, 60), ("capacity", stage_capacity, 60), ("distill", stage_distill, 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting stages after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-session-out"), help="folder for the JSON and table")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, kernels under TRITON_INTERPRET=1")
    ap.add_argument("--stages", default=",".join(n for n, _, _ in STAGES), help="comma-separated subset")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernels.triton_* import
    elif not torch.cuda.is_available():
        print("gpu_session: no CUDA device here (torch.cuda.is_available() is False); use --dry-run on CPU",
              file=sys.stderr)
        return 2
    wanted = args.stages.split(",")
    unknown = set(wanted) - {n for n, _, _ in STAGES}
    if unknown:
        print(f"gpu_session: unknown stage(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    session = Session(Plan.tiny() if args.dry_run else Plan(dry_run=False), Path(args.out),
                      time.monotonic() + args.budget_s)
    for name, stage, min_s in STAGES:
        if name in wanted:
            session.run(name, stage, min_s)
    text = table(session.results)
    (session.out / "gpu_session.txt").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
