"""Compile every Triton kernel for a CUDA target on a machine without a GPU.

    python -m kernels.triton_aot [--arch 90] [--all]

The interpreter (``TRITON_INTERPRET=1``) runs kernels as numpy and accepts code that the
real compiler rejects (non-constexpr globals, type mismatches, layouts that do not fit
shared memory). Lowering each kernel to a cubin with the ptxas that ships with Triton
catches those in CI, before a GPU session pays for them. Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import triton_attention as ta
from kernels import triton_gemm as tg
from kernels import triton_kv as tk


def _p(t: str) -> str:
    return "*" + t


_ATT = dict(k_ptr=_p("i8"), v_ptr=_p("i8"), ks_ptr=_p("fp32"), vs_ptr=_p("fp32"), bt_ptr=_p("i64"), sm_scale="fp32")
_GEMM = dict(x_ptr=_p("i8"), w_ptr=_p("i8"), xs_ptr=_p("fp32"), ws_ptr=_p("fp32"), b_ptr=_p("fp32"))


def variants(everything: bool) -> list[tuple]:
    """(kernel, pointer/float argument types, constexprs, options) as the wrappers launch them for cai-13b-skv."""
    out = [
        (tg._quant_rows_kernel, dict(x_ptr=_p("bf16"), q_ptr=_p("i8"), s_ptr=_p("fp32")),
         dict(BLOCK=4096), dict(num_warps=8)),
        (tg._rotate_quant_rows_kernel, dict(x_ptr=_p("fp32"), q_ptr=_p("i8"), s_ptr=_p("fp32"), norm="fp32"),
         dict(R=512, LOG2R=9), dict(num_warps=8)),
        (tg._w8a8_kernel, dict(_GEMM, o_ptr=_p("bf16")),
         dict(HAS_BIAS=True, SCALED=True, EVEN_K=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
         dict(num_warps=8, num_stages=4)),
        (tg._w8a8_kernel, dict(_GEMM, o_ptr=_p("fp32")),  # decode-sized M, no bias
         dict(HAS_BIAS=False, SCALED=True, EVEN_K=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8),
         dict(num_warps=4, num_stages=4)),
        (tg._w8a8_kernel, dict(_GEMM, o_ptr=_p("bf16")),  # a decode batch of 128
         dict(HAS_BIAS=False, SCALED=True, EVEN_K=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=256, GROUP_M=8),
         dict(num_warps=8, num_stages=4)),
        (tg._w8a8_kernel, dict(_GEMM, o_ptr=_p("i32")),  # a split-K partial (K split across programs)
         dict(HAS_BIAS=False, SCALED=False, EVEN_K=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8),
         dict(num_warps=4, num_stages=4)),
        (tg._split_k_sum_kernel, dict(p_ptr=_p("i32"), xs_ptr=_p("fp32"), ws_ptr=_p("fp32"), b_ptr=_p("fp32"),
                                      o_ptr=_p("bf16")),
         dict(HAS_BIAS=False, SCALED=True, BLOCK_M=16, BLOCK_N=64), {}),
        (tk._write_kv_kernel, dict(k_ptr=_p("bf16"), v_ptr=_p("bf16"), kp_ptr=_p("i8"), vp_ptr=_p("i8"),
                                   ks_ptr=_p("fp32"), vs_ptr=_p("fp32"), slots_ptr=_p("i64")),
         dict(BS=64, D=128, BLOCK_H=1), {}),
        (ta._merge_kernel, dict(po_ptr=_p("fp32"), pm_ptr=_p("fp32"), pl_ptr=_p("fp32"), o_ptr=_p("bf16")),
         dict(D=128, BLOCK_S=8), {}),
    ]
    combos = [(dt, win, split) for dt in ("bf16", "fp32") for win in (False, True) for split in (False, True)]
    if not everything:
        combos = [("bf16", True, True), ("fp32", False, False)]
    for dt, win, split in combos:
        io = dict(_ATT, q_ptr=_p(dt), o_ptr=_p(dt))
        opts = dict(num_warps=4, num_stages=2)
        partials = dict(lens_ptr=_p("i64"), po_ptr=_p("fp32"), pm_ptr=_p("fp32"), pl_ptr=_p("fp32"))
        out.append((ta._decode_kernel, dict(io, **partials),
                    dict(HAS_WINDOW=win, SPLIT=split, IEEE=dt == "fp32", BS=64, D=128, BLOCK_G=64), opts))
        if split or not everything:
            out.append((ta._prefill_kernel, io, dict(HAS_WINDOW=win, IEEE=dt == "fp32", BS=64, D=128, BLOCK_M=64), opts))
    return out


UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_on")  # 1 at every launch: the JIT specializes them away


def compile_one(fn, types: dict, constexprs: dict, options: dict, arch: int):
    """As a launch with torch tensors specializes it: unit strides constant, pointers and strides 16-divisible
    (without those hints the compiler can neither vectorize the loads nor software-pipeline them)."""
    names = fn.arg_names
    constexprs = {**{n: 1 for n in UNIT_STRIDES if n in names}, **constexprs}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n not in constexprs and (n.endswith("_ptr") or n.startswith(("s_", "stride_")))]
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="SM version (90 = H100/H200)")
    ap.add_argument("--all", action="store_true", help="every constexpr combination, not one of each kind")
    args = ap.parse_args(argv)
    failed = 0
    for fn, types, constexprs, options in variants(args.all):
        try:
            kernel = compile_one(fn, types, constexprs, options, args.arch)
            print(f"ok   {fn.__name__} {constexprs}: {kernel.metadata.shared} B shared memory")
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL {fn.__name__} {constexprs}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
