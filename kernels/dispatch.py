"""Picks an implementation per call: Triton on CUDA tensors, the torch reference otherwise.

The model and the paged engine call only these names, so the CPU path is exactly
``kernels.reference`` and the GPU path needs no change above this layer. Triton is
imported on the first CUDA call, never at import time: the package works without it
(it comes with the ``gpu`` / ``test`` extras). ``PDSERVE_KERNELS=reference`` forces the
reference everywhere (to bisect a numerical difference on a GPU); ``PDSERVE_KERNELS=triton``
forces the Triton kernels on any tensor, which with ``TRITON_INTERPRET=1`` runs the GPU path's
code on CPU tensors (the device session's dry run does this).
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from kernels import cpu_attention, cpu_fused, cpu_gemm, gemm_plan, reference

dequantize_rows = reference.dequantize_rows  # one elementwise op: torch is already optimal
attention = reference.attention  # dense attention of the contiguous cache (tests, small runs)
gather_kv = reference.gather_kv


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("PDSERVE_KERNELS", "auto")
    if mode == "triton":
        return True
    return t.is_cuda and mode != "reference" and triton_available()


def _triton(name: str) -> ModuleType:
    return importlib.import_module(f"kernels.triton_{name}")


def _on(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Block tables, lengths and slots are built on the host; the kernels read them on the device."""
    return index.to(like.device, non_blocking=True)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x) and x.numel():
        return _triton("gemm").quantize_rows(x)
    return reference.quantize_rows(x)


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                forms: cpu_gemm.WeightForms | None = None) -> torch.Tensor:
    """``forms``: the caller's ``cpu_gemm.WeightForms(wq)``, passed where ``int8_gemm_in_float`` said so."""
    if use_triton(xq):
        return _triton("gemm").int8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype)
    return reference.int8_matmul(xq, x_scale, wq, w_scale, bias, out_dtype, forms)


def int8_gemm_in_float(x: torch.Tensor) -> bool:
    """Whether the GEMM of these rows [M, K] takes a CPU route with float inputs (``kernels.gemm_plan``'s measured
    plan: C or float32 GEMMs); then the caller quantizes with ``quantize_rows_float`` and passes ``WeightForms``."""
    return x.is_cpu and not use_triton(x) and gemm_plan.plan().use_float(x.shape[0])


quantize_rows_float = reference.quantize_rows_float  # the float route runs on CPU only
rotate_quantize_rows_float = cpu_fused.rotate_quantize_rows_float


def fused_prologue(x: torch.Tensor) -> bool:
    """Whether these rows' rotate + quantize runs as one call: the Triton kernel on the Triton path
    (``PDSERVE_TRITON_PROLOGUE=off`` keeps the torch butterflies there, for A/Bs), the C loop
    (``kernels.cpu_fused``) on CPU tensors where it is built. Either gives the torch ops' bits."""
    if use_triton(x):
        return os.environ.get("PDSERVE_TRITON_PROLOGUE", "on") != "off"
    return x.is_cpu and cpu_fused.available()


def fused_linear(x: torch.Tensor) -> bool:
    """Whether a rotated int8 linear of these float32 rows runs as one C call (prologue and rows GEMM:
    ``cpu_gemm.linear_rows_c``): CPU rows the measured plan sends to the C rows route, the library built."""
    return (x.is_cpu and x.dtype == torch.float32 and not use_triton(x) and cpu_fused.available()
            and hasattr(cpu_fused.library(), "pdserve_int8_linear_rows") and gemm_plan.plan().use_c_rows(x.shape[0]))


int8_linear_rows = cpu_gemm.linear_rows_c


def rotate_quantize_rows(x: torch.Tensor, block: int, in_float: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(hadamard_rotate(x, block))`` where ``fused_prologue(x)``: int8 codes, or on the CPU's
    float GEMM route (``in_float``) the same integers held in float32."""
    if use_triton(x):
        return _triton("gemm").rotate_quantize_rows(x, block)
    return cpu_fused.rotate_quantize_rows_float(x, block, as_int8=not in_float)


def small_ops_in_c(*tensors: torch.Tensor) -> bool:
    """Whether the model's RoPE and RMSNorm tail run as C calls on these (``rope_heads_``, ``rms_scale``): float32
    contiguous CPU tensors, the library built. They give the torch ops' bits; at batch 1 the ops' dispatch, not
    their arithmetic, is their cost."""
    return not use_triton(tensors[0]) and cpu_fused.small_ops_usable(*tensors)


rope_heads_ = cpu_fused.rope_heads_
rms_scale = cpu_fused.rms_scale


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor | None,
             v_scale: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    if k_scale is not None and use_triton(k):  # float pools (reference runs) stay on torch
        return _triton("kv").write_kv(k_pool, v_pool, k_scale, v_scale, k, v, _on(slots, k))
    if cpu_fused.write_kv_usable(k_pool, k_scale, k):
        return cpu_fused.write_kv_int8(k_pool, v_pool, k_scale, v_scale, k, v, slots)
    return reference.write_kv(k_pool, v_pool, k_scale, v_scale, k, v, slots)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           window: int | None = None) -> torch.Tensor:
    if k_scale is not None and use_triton(q):
        return _triton("attention").paged_decode_attention(q, k_pool, v_pool, k_scale, v_scale,
                                                           _on(block_tables, q), _on(seq_lens, q), window)
    if cpu_attention.usable(q, k_pool, k_scale):
        return cpu_attention.paged_decode_attention(q, k_pool, v_pool, k_scale, v_scale, block_tables, seq_lens, window)
    return reference.paged_decode_attention(q, k_pool, v_pool, k_scale, v_scale, block_tables, seq_lens, window)


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                            block_table: torch.Tensor, start: int, window: int | None = None) -> torch.Tensor:
    if k_scale is not None and use_triton(q):
        return _triton("attention").paged_prefill_attention(q, k_pool, v_pool, k_scale, v_scale,
                                                            _on(block_table, q), int(start), window)
    if cpu_attention.usable(q, k_pool, k_scale):
        return cpu_attention.paged_prefill_attention(q, k_pool, v_pool, k_scale, v_scale, block_table, int(start),
                                                     window)
    return reference.paged_prefill_attention(q, k_pool, v_pool, k_scale, v_scale, block_table, start, window)
