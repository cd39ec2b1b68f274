"""The Triton kernels on a GPU: correctness there first, then speed against torch.

    python -m benchmarks.kernels [--quick]

Shapes are those of ``cai-13b-skv`` (d=5120, 40 query heads over 1 KV head of 128,
FFN 12288, blocks of 64, local window 1024). Baselines: bf16 ``torch.matmul`` for the
GEMM (and ``torch._int_mm``), ``scaled_dot_product_attention`` over dequantized bf16 KV
for attention. Times are medians of ``triton.testing.do_bench``; rates are printed beside
the device's peak (dense, from the table below, chosen by device name). Goals (issue 8):
int8 GEMM >= 1.5x bf16 at M >= 512; decode attention >= 70% of HBM bandwidth at batch
>= 32 and context >= 8k.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.nn import functional as F

from model.presets import get_preset

# name fragment -> (int8 dense TOPS, bf16 dense TFLOPS, HBM TB/s); first match wins
PEAKS = (
    ("H200", (1979.0, 989.0, 4.8)),
    ("H100 PCIe", (1513.0, 756.0, 2.0)),
    ("H100 NVL", (1671.0, 835.0, 3.9)),
    ("H100", (1979.0, 989.0, 3.35)),  # SXM, HBM3
    ("A100-SXM4-80GB", (624.0, 312.0, 2.04)),
    ("A100", (624.0, 312.0, 1.56)),
)
GEMM_M = (1, 32, 256, 512, 2048, 8192)
DECODE_BATCH = (1, 32, 64, 256)
CONTEXTS = (1024, 8192, 32768)
PREFILL_CASES = ((0, 2048), (0, 8192), (6144, 2048))  # (cached prefix, chunk)
WRITE_TOKENS = (256, 8192)
CHECK_GEMM_SHAPES = ((1, 256, 512), (77, 320, 5120), (600, 1024, 12288))  # (M, N, K)


def peaks(name: str) -> tuple[float, float, float] | None:
    return next((p for frag, p in PEAKS if frag in name), None)


def bench(fn) -> float:
    """Median seconds of ``fn`` (triton.testing.do_bench: warmed up, L2 flushed between runs).

    Without CUDA (the device session's dry run, kernels under TRITON_INTERPRET=1) a plain
    median of three host-timed calls after one warm-up: it checks the plumbing, not the speed.
    """
    if not torch.cuda.is_available():
        import statistics
        import time

        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def _pct(x: float, peak: float | None) -> str:
    return f"{100 * x / peak:.0f}%" if peak else "n/a"


# -- correctness on the device ---------------------------------------------------------------------
def check_correctness(dev: torch.device) -> list[str]:
    """Each kernel against its reference on the device, at the model's shapes; the checks that failed."""
    from kernels import reference
    from kernels import triton_attention as ta
    from kernels import triton_gemm as tg
    from kernels import triton_kv as tk

    g = torch.Generator(device=dev).manual_seed(0)
    failures = []

    def expect(ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    for m, n, k in CHECK_GEMM_SHAPES:
        xq = torch.randint(-127, 128, (m, k), device=dev, generator=g, dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), device=dev, generator=g, dtype=torch.int8)
        acc = tg.int8_matmul(xq, torch.ones(m, 1, device=dev), wq, torch.ones(n, device=dev), out_dtype=torch.int32)
        expect(torch.equal(acc.cpu().long(), xq.cpu().long() @ wq.cpu().long().T), f"int8 GEMM {m}x{n}x{k}: exact int32")
    x = torch.randn(300, 5120, device=dev, generator=g) * 5
    # against the CPU reference: torch on CUDA divides by a Python scalar through its reciprocal
    expect(all(torch.equal(a.cpu(), b) for a, b in zip(tg.quantize_rows(x), reference.quantize_rows(x.cpu()))),
           "quantize_rows: bit-identical codes and scales (CPU reference)")
    nb, bs, hkv, d = 64, 64, 2, 128
    pools = [torch.zeros(nb, bs, hkv, d, dtype=torch.int8, device=dev) for _ in range(2)]
    pools += [torch.zeros(nb, bs, hkv, 1, device=dev) for _ in range(2)]
    kv = torch.randn(2, nb * bs, hkv, d, device=dev, generator=g)
    slots = torch.randperm(nb * bs, device=dev, generator=g)
    want = [p.clone() for p in pools]
    tk.write_kv(*pools, kv[0], kv[1], slots)
    reference.write_kv(*want, kv[0], kv[1], slots)
    expect(all(torch.equal(a, b) for a, b in zip(pools[:2], want[:2])), "write_kv: exact int8 codes")
    expect(all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(pools[2:], want[2:])), "write_kv: scales")
    lens = torch.tensor([1, 63, 64, 700, 1500, 4000], device=dev)
    table = torch.randperm(nb, device=dev, generator=g)[: 6 * 8].view(6, 8).clone()  # up to 8 blocks: 512 tokens
    lens = lens.clamp_max(8 * bs)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        q = torch.randn(6, 8, d, device=dev, generator=g).to(dtype)
        for window in (None, 100):
            for splits in (1, 3):
                got = ta.paged_decode_attention(q, *pools, table, lens, window, num_splits=splits).float()
                exp = reference.paged_decode_attention(q.float(), *pools, table, lens, window)
                err = float((got - exp).abs().max() / exp.abs().max())
                expect(err < tol, f"decode {dtype}, window {window}, {splits} split(s): rel err {err:.1e}")
            qp = torch.randn(300, 8, d, device=dev, generator=g).to(dtype)
            got = ta.paged_prefill_attention(qp, *pools, table[5], 150, window).float()
            exp = reference.paged_prefill_attention(qp.float(), *pools, table[5], 150, window)
            err = float((got - exp).abs().max() / exp.abs().max())
            expect(err < tol, f"prefill {dtype}, window {window}: rel err {err:.1e}")
    return failures


# -- timings -----------------------------------------------------------------------------------------
def gemm_shapes(preset: str = "cai-13b-skv") -> list[tuple[str, int, int]]:
    c = get_preset(preset)
    return [("qkv (producer)", (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim),
            ("o", c.dim, c.n_heads * c.head_dim), ("gate+up", 2 * c.ffn_dim, c.dim), ("down", c.dim, c.ffn_dim)]


def bench_gemm(dev: torch.device, pk, ms, preset: str = "cai-13b-skv") -> list[dict]:
    """One row per (layer, M): times in ms and the speed-up of int8 over bf16."""
    from kernels import triton_gemm as tg

    print("\n### W8A8 GEMM vs bf16 torch.matmul\n")
    print("| layer | M | N | K | int8 Triton ms | int8 TOPS (% peak) | +quant ms | torch._int_mm ms "
          "| bf16 matmul ms | bf16 TFLOPS (% peak) | speed-up vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, n, k in gemm_shapes(preset):
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
        ws = torch.rand(n, device=dev)
        wb = torch.randn(n, k, dtype=torch.bfloat16, device=dev)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            xq, xs = tg.quantize_rows(x)
            t8 = bench(lambda: tg.int8_matmul(xq, xs, wq, ws, out_dtype=torch.bfloat16))
            tq = bench(lambda: tg.int8_matmul(*tg.quantize_rows(x), wq, ws, out_dtype=torch.bfloat16))
            tint = bench(lambda: torch._int_mm(xq, wq.t())) if m > 16 and dev.type == "cuda" else float("nan")
            tb = bench(lambda: torch.matmul(x, wb.t()))
            flops = 2 * m * n * k
            ratio = tb / t8
            rows.append(dict(layer=name, m=m, n=n, k=k, int8_ms=t8 * 1e3, int8_quant_ms=tq * 1e3, int_mm_ms=tint * 1e3,
                             bf16_ms=tb * 1e3, int8_tops=flops / t8 / 1e12, bf16_tflops=flops / tb / 1e12,
                             speedup=ratio))
            print(f"| {name} | {m} | {n} | {k} | {t8 * 1e3:.3f} | {flops / t8 / 1e12:.0f} ({_pct(flops / t8 / 1e12, pk and pk[0])})"
                  f" | {tq * 1e3:.3f} | {tint * 1e3:.3f} | {tb * 1e3:.3f} | {flops / tb / 1e12:.0f} "
                  f"({_pct(flops / tb / 1e12, pk and pk[1])}) | {ratio:.2f}x |")
    return rows


def bench_prologue(dev: torch.device, ms, preset: str = "cai-13b-skv") -> list[dict]:
    """The int8 linear's prologue (rotate + quantize per row) as one Triton kernel vs the torch butterflies
    then the Triton quantize (the unfused GPU path), at each distinct input width; also whether the two
    give the same codes and scales on the device."""
    from kernels import triton_gemm as tg
    from model.quant import hadamard_block, hadamard_rotate

    print("\n### Rotate + quantize (the int8 linear's prologue): one Triton kernel vs torch butterflies + quantize\n")
    print("| K | block | M | fused ms | torch + quantize ms | speed-up | same bits |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for k in sorted({k for _, _, k in gemm_shapes(preset)}):
        block = hadamard_block(k)
        for m in ms:
            x = torch.randn(m, k, device=dev)
            tf = bench(lambda: tg.rotate_quantize_rows(x, block))
            tt = bench(lambda: tg.quantize_rows(hadamard_rotate(x, block)))
            same = all(torch.equal(a, b) for a, b in zip(tg.rotate_quantize_rows(x, block),
                                                        tg.quantize_rows(hadamard_rotate(x, block))))
            rows.append(dict(k=k, block=block, m=m, fused_ms=tf * 1e3, torch_ms=tt * 1e3, speedup=tt / tf, same=same))
            print(f"| {k} | {block} | {m} | {tf * 1e3:.4f} | {tt * 1e3:.4f} | {tt / tf:.2f}x | {same} |")
    return rows


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """SDPA with K/V heads shared by query heads: native GQA where this torch has it, else an expanded view."""
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    except (TypeError, RuntimeError):
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.expand(-1, rep, -1, -1), v.expand(-1, rep, -1, -1), **kw)


def _decode_case(dev, b: int, ctx: int, h: int, d: int, bs: int):
    nblk = _cdiv(ctx, bs)
    pools = [torch.randint(-127, 128, (b * nblk, bs, 1, d), dtype=torch.int8, device=dev) for _ in range(2)]
    pools += [torch.rand(b * nblk, bs, 1, 1, device=dev) * 0.02 for _ in range(2)]
    table = torch.randperm(b * nblk, device=dev).view(b, nblk)
    lens = torch.full((b,), ctx, device=dev)
    q = torch.randn(b, h, d, dtype=torch.bfloat16, device=dev)
    return q, pools, table, lens


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bench_decode(dev: torch.device, pk, batches, contexts, preset: str = "cai-13b-skv",
                 hbm_gbs: float | None = None) -> list[dict]:
    """One row per (batch, context, window); ``hbm_fraction`` is against ``hbm_gbs`` (measured) or the datasheet."""
    from kernels import triton_attention as ta

    c = get_preset(preset)
    h, d, bs = c.n_heads, c.head_dim, c.block_size
    window = next(s.window for s in c.layers if s.window is not None)
    print(f"\n### Paged decode attention (MQA {h}:1, head_dim {d}, int8 KV, blocks of {bs}) vs SDPA over bf16 KV\n")
    print("| batch | context | window | Triton ms | GB/s (% HBM peak) | SDPA bf16 ms | SDPA GB/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    peak_gbs = hbm_gbs or (pk[2] * 1e3 if pk else None)
    for b in batches:
        for ctx in contexts:
            q, pools, table, lens = _decode_case(dev, b, ctx, h, d, bs)
            for win in (None, window) if ctx > window else (None,):
                t = bench(lambda: ta.paged_decode_attention(q, *pools, table, lens, win))
                read = min(ctx, win or ctx)
                nbytes = b * read * (2 * d + 8) + 2 * q.numel() * q.element_size()
                gbs = nbytes / t / 1e9
                k = (pools[0].view(b, -1, d)[:, ctx - read:ctx].float() * pools[2].view(b, -1, 1)[:, ctx - read:ctx])
                kb = k.to(torch.bfloat16)[:, None]  # [B, 1, L, D]; V's values do not change the timing
                tsd = bench(lambda: _sdpa(q[:, :, None], kb, kb))
                sd_bytes = 2 * kb.numel() * 2 + 2 * q.numel() * 2
                rows.append(dict(batch=b, context=ctx, window=win, triton_ms=t * 1e3, gbs=gbs, sdpa_bf16_ms=tsd * 1e3,
                                 speedup=tsd / t, hbm_fraction=gbs / peak_gbs if peak_gbs else None))
                print(f"| {b} | {ctx} | {win or '-'} | {t * 1e3:.3f} | {gbs:.0f} ({_pct(gbs / 1e3, pk and pk[2])}) "
                      f"| {tsd * 1e3:.3f} | {sd_bytes / tsd / 1e9:.0f} | {tsd / t:.2f}x |")
                del k, kb
            del q, pools, table, lens
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_prefill_and_write(dev: torch.device, pk, preset: str = "cai-13b-skv", prefill_cases=PREFILL_CASES,
                            write_tokens=WRITE_TOKENS) -> list[dict]:
    from kernels import reference
    from kernels import triton_attention as ta
    from kernels import triton_kv as tk

    rows = []
    c = get_preset(preset)
    h, d, bs = c.n_heads, c.head_dim, c.block_size
    print("\n### Paged prefill attention (causal, one sequence) vs SDPA over bf16 KV\n")
    print("| prefix | chunk | Triton ms | TFLOPS (% bf16 peak) | SDPA bf16 ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for start, t in prefill_cases:
        q, pools, table, _ = _decode_case(dev, 1, start + t, h, d, bs)
        q = torch.randn(t, h, d, dtype=torch.bfloat16, device=dev)
        tt = bench(lambda: ta.paged_prefill_attention(q, *pools, table[0], start))
        kb = (pools[0].view(1, -1, d)[:, : start + t].float() * 0.02).to(torch.bfloat16)[:, None]
        qs = q.transpose(0, 1)[None]
        mask = torch.ones(t, start + t, dtype=torch.bool, device=dev).tril(start)
        tsd = bench(lambda: _sdpa(qs, kb, kb, attn_mask=None if start == 0 else mask, is_causal=start == 0))
        flops = 4 * h * d * (t * start + t * (t + 1) / 2)
        tf = flops / tt / 1e12
        rows.append(dict(kind="prefill", prefix=start, chunk=t, triton_ms=tt * 1e3, tflops=tf, sdpa_bf16_ms=tsd * 1e3,
                         speedup=tsd / tt))
        print(f"| {start} | {t} | {tt * 1e3:.3f} | {tf:.0f} ({_pct(tf, pk and pk[1])}) | {tsd * 1e3:.3f} | {tsd / tt:.2f}x |")
    print("\n### KV write (quantize + scatter) vs the torch reference on the GPU\n")
    print("| tokens | Triton ms | GB/s (% HBM peak) | torch reference ms | speed-up |")
    print("|---|---|---|---|---|")
    nb = 1024
    pools = [torch.zeros(nb, bs, 1, d, dtype=torch.int8, device=dev) for _ in range(2)]
    pools += [torch.zeros(nb, bs, 1, 1, device=dev) for _ in range(2)]
    for n in write_tokens:
        k = torch.randn(n, 1, d, dtype=torch.bfloat16, device=dev)
        slots = torch.randperm(nb * bs, device=dev)[:n]
        tt = bench(lambda: tk.write_kv(*pools, k, k, slots))
        tr = bench(lambda: reference.write_kv(*pools, k, k, slots))
        gbs = n * (2 * d * 2 + 2 * d + 8 + 8) / tt / 1e9
        rows.append(dict(kind="write_kv", tokens=n, triton_ms=tt * 1e3, gbs=gbs, reference_ms=tr * 1e3, speedup=tr / tt))
        print(f"| {n} | {tt * 1e3:.4f} | {gbs:.0f} ({_pct(gbs / 1e3, pk and pk[2])}) | {tr * 1e3:.4f} | {tr / tt:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.kernels needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                 f"(torch {torch.__version__}). The CPU correctness tests are tests/test_kernels_triton.py.")
    try:
        import triton
    except ImportError:
        sys.exit("benchmarks.kernels needs triton: pip install -e '.[gpu]'")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("benchmarks.kernels: unset TRITON_INTERPRET (the interpreter would time numpy, not the GPU)")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    pk = peaks(name)
    print(f"## Kernels on {name} (torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda})")
    print(f"peak (dense): {'int8 %.0f TOPS, bf16 %.0f TFLOPS, HBM %.2f TB/s' % pk if pk else 'unknown for this device'}")
    print("\ncorrectness on the device:")
    failures = check_correctness(dev)
    if failures:
        sys.exit(f"benchmarks.kernels: {len(failures)} correctness check(s) failed on the GPU: {failures}")
    os.environ["PDSERVE_KERNEL_CHECKS"] = "0"  # value checks sync the host: keep them out of the timings
    gemm = bench_gemm(dev, pk, GEMM_M[1::2] if args.quick else GEMM_M)
    decode = bench_decode(dev, pk, DECODE_BATCH[1:2] if args.quick else DECODE_BATCH,
                          CONTEXTS[1:2] if args.quick else CONTEXTS)
    bench_prefill_and_write(dev, pk)
    bench_prologue(dev, GEMM_M[1::2] if args.quick else GEMM_M)
    print("\n### Goals\n")
    for line in goals(gemm, decode):
        print(f"- {line}")


def goals(gemm: list[dict], decode: list[dict]) -> list[str]:
    """The issue's kernel goals, each with its worst and best measured case."""
    lines = []
    ratios = [r["speedup"] for r in gemm if r["m"] >= 512]
    if ratios:
        lines.append(f"int8 GEMM >= 1.5x bf16 matmul at M >= 512: {'met' if min(ratios) >= 1.5 else 'NOT met'} "
                     f"(worst {min(ratios):.2f}x, best {max(ratios):.2f}x)")
    fractions = [r["hbm_fraction"] for r in decode
                 if r["window"] is None and r["batch"] >= 32 and r["context"] >= 8192 and r["hbm_fraction"]]
    if fractions:
        lines.append(f"decode attention >= 70% of HBM bandwidth at batch >= 32, context >= 8k: "
                     f"{'met' if min(fractions) >= 0.7 else 'NOT met'} (worst {min(fractions):.0%}, "
                     f"best {max(fractions):.0%})")
    return lines


if __name__ == "__main__":
    main()
