"""One prepared device session: everything a lent GPU should measure, in one call, within a budget.

    python -m benchmarks.gpu_session --budget-s 420 --out "$OUT"      # on an H100 / H200
    python -m benchmarks.gpu_session --dry-run --out /tmp/gs           # on CPU: the plumbing, tiny shapes

GPUs are lent to few tasks, for minutes (issue 18), so nothing here may need debugging on the
device: every stage runs in a dry run on CPU first (CI does), a stage that fails is recorded
with its error and the session goes on, and the JSON is rewritten after every stage so that a
run cut off at its limit still returns what it measured. Stages, in order:

1. ``device``: name, versions, and the two ceilings measured here (device-to-device copy GB/s,
   8192^3 bf16 matmul TFLOP/s) plus ``torch._int_mm`` TOPS.
2. ``kernel_tests``: tests/test_kernels_triton*.py on the device (the interpreter's tests, with
   CUDA tensors), then ``benchmarks.kernels``' correctness checks at the model's shapes.
3. ``kernels``: W8A8 GEMM vs bf16 matmul, paged decode attention vs the HBM floor, prefill
   attention and KV write, the fused rotate + quantize vs the torch butterflies (``benchmarks.kernels``),
   on ``cai-13b-skv`` shapes.
4. ``tiles``: W8A8 tile shapes swept at decode row counts (``benchmarks.gemm_tiles``); the engine stage
   times graph steps with the winners too.
5. ``engine``: the paged engine on ``cai-13b-skv`` with random int8 weights (bf16 compute):
   decode step time at batch x context against the bytes floor (weights + KV read once per
   step, at the measured copy bandwidth), eager and as CUDA graphs (these with the fused prologue
   and with the torch butterflies: an A/B in one run), graphs vs eager greedy tokens with the
   top-2 margin where they differ and the first layer output that differs (``benchmarks.graph_vs_eager``),
   and prefill tokens/s against the int8 compute floor.
6. ``capacity``: the largest batch whose KV fits at 8k and 32k context, from the engine's own
   allocator with the memory left after the weights, for ``cai-13b-skv`` and ``cai-13b-gqa8``
   (int8 KV both, so the ratio is what the KV layout buys), each checked by running decode
   steps at that batch.
7. ``distill``: not run here: it needs the SmolLM2 GGUF (98 MB) carried in two calls; recorded
   as skipped.

Writes ``gpu_session.json`` (every figure) and ``gpu_session.txt`` (the short table, also
printed last) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.gpu_engine import stage_capacity, stage_engine

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
           "tests/test_kernels_triton_paged.py", *s.plan.test_args]
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
        figures["fused_prologue"] = _fused_prologue_check(s.dev)
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


def _fused_prologue_check(dev: torch.device) -> dict:
    """The Triton rotate + quantize against the CPU torch butterflies + quantize at a 13B width. If it fails
    to build or differs, the session's later stages run the torch butterflies (PDSERVE_TRITON_PROLOGUE=off)
    rather than fail: recorded here, and the engine's A/B rows then compare the same path twice."""
    from kernels import reference
    from kernels import triton_gemm as tg
    from model.quant import hadamard_rotate

    x = torch.randn(64, 5120, generator=torch.Generator().manual_seed(3)) * 4
    try:
        got_q, got_s = tg.rotate_quantize_rows(x.to(dev), 512)
        want_q, want_s = reference.quantize_rows(hadamard_rotate(x, 512))
        out = {"code_mismatches": int((got_q.cpu() != want_q).sum()), "scale_mismatches": int((got_s.cpu() != want_s).sum())}
    except Exception as e:  # noqa: BLE001 - recorded; the session goes on without the fused prologue
        out = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
    if "error" in out or out["code_mismatches"] or out["scale_mismatches"]:
        os.environ["PDSERVE_TRITON_PROLOGUE"] = "off"
        out["fallback"] = "PDSERVE_TRITON_PROLOGUE=off for the rest of the session"
    return out


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
        try:
            prologue = kb.bench_prologue(dev, p.gemm_m, p.preset)
        except Exception as e:  # noqa: BLE001 - keep the figures above
            prologue = {"error": f"{type(e).__name__}: {str(e)[:1500]}"}
    finally:
        os.environ.pop("PDSERVE_KERNEL_CHECKS", None)
    return {"gemm": gemm, "decode": decode, "prefill_and_write": other, "prologue": prologue,
            "goals": kb.goals(gemm, decode),
            "hbm_reference": "measured copy" if hbm else "datasheet"}


def stage_tiles(s: Session) -> dict:
    """W8A8 tile shapes swept at decode row counts (``benchmarks.gemm_tiles``); the engine stage then times
    graph steps with the winners beside the rule's tiles."""
    from benchmarks import gemm_tiles

    ms = (128, 32, 1) if not s.plan.dry_run else (1, 20)
    os.environ["PDSERVE_KERNEL_CHECKS"] = "0"
    try:
        return gemm_tiles.sweep(s.dev, ms, s.plan.preset, budget_s=max(20.0, min(150.0, s.left() - 150)),
                                dry_run=s.plan.dry_run)
    finally:
        os.environ.pop("PDSERVE_KERNEL_CHECKS", None)


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
    prologue = results.get("kernels", {}).get("prologue", [])
    for r in prologue if isinstance(prologue, list) else [{"error": prologue.get("error")}]:
        if "error" in r:
            lines.append(f"prologue benchmark: {r['error'][:300]}")
            continue
        lines.append(f"prologue K={r['k']} M={r['m']}: fused {r['fused_ms']:.4f} ms vs torch {r['torch_ms']:.4f} ms "
                     f"({r['speedup']:.2f}x), same bits: {r['same']}")
    for b in results.get("tiles", {}).get("best", []):
        lines.append(f"tiles {b['layer']} M={b['m']}: rule {b['rule_ms']:.4f} ms, previous rule {b['previous_ms']:.4f} "
                     f"ms, best {b['best_ms']:.4f} ms ({b['speedup']:.2f}x the rule) with {b['tiles']}")
    for g in results.get("kernels", {}).get("goals", []):
        lines.append(f"goal: {g}")
    for r in results.get("engine", {}).get("decode", []):
        if r.get("graphs") and "step_ms" in r:
            floor = f"{r['x_floor']:.2f}x floor" if r.get("x_floor") else "no floor"
            lines.append(f"engine decode b={r['batch']} ctx={r['context']} as a CUDA graph ({r['graphs']}, "
                         f"{r.get('prologue', 'fused')} prologue, {r.get('tiles', 'rule')} tiles): "
                         f"{r['step_ms']:.2f} ms/step, {r['tokens_per_s']:.0f} tok/s, {floor}")
        elif r.get("graphs"):
            lines.append(f"engine decode b={r['batch']} ctx={r['context']} as a CUDA graph "
                         f"({r.get('prologue', 'fused')} prologue): {r.get('error', '')[:300]}")
        elif r.get("value_checks") and "step_ms" in r:
            lines.append(f"engine decode b={r['batch']} ctx={r['context']} with kernel value checks on: "
                         f"{r['step_ms']:.2f} ms/step (forward {r['forward_ms']:.2f})")
        elif "step_ms" in r:
            floor = f"{r['x_floor']:.2f}x floor" if r.get("x_floor") else "no floor"
            lines.append(f"engine decode b={r['batch']} ctx={r['context']}: {r['step_ms']:.2f} ms/step "
                         f"(forward {r['forward_ms']:.2f}), {r['tokens_per_s']:.0f} tok/s, {floor}")
    if results.get("engine", {}).get("graph_agreement"):
        a = results["engine"]["graph_agreement"]
        lines.append(f"graphs vs eager greedy tokens: { {k: v for k, v in a.items() if k != 'margins'} }")
        if isinstance(a.get("margins"), list) and a["margins"]:
            lines.append("  top-2 margin / near-tie bound where they first differ: " + ", ".join(
                f"{m['margin']:.3g}/{m['bound']:.3g}" for m in a["margins"]))
    div = results.get("engine", {}).get("graph_divergence") or {}
    if "first_difference" in div:
        worst = max(div["relative_max_difference"].items(), key=lambda kv: kv[1], default=(None, 0.0))
        lines.append(f"graphs' static path vs eager, one decode step: first differing output "
                     f"{div['first_difference']}; largest relative difference {worst[1]:.2e} at {worst[0]}")
    elif div:
        lines.append(f"graphs' static path vs eager: {div.get('error', '')[:300]}")
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
          ("tiles", stage_tiles, 60), ("engine", stage_engine, 60), ("capacity", stage_capacity, 60), ("distill", stage_distill, 0))


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
