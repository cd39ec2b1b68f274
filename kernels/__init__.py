"""Compute kernels and the one dispatch the model uses.

Every op has a torch reference (``kernels.reference``), which is the CPU path and the
oracle the Triton kernels (``kernels.triton_*``, used for CUDA tensors) are tested against.
"""
from kernels.cpu_gemm import WeightForms as Int8WeightForms
from kernels.dispatch import (attention, dequantize_rows, fused_linear, fused_prologue, gather_kv, int8_gemm_in_float,
                              int8_linear_rows, int8_matmul, paged_decode_attention, paged_prefill_attention,
                              quantize_rows, quantize_rows_float, rms_scale, rope_heads_, rotate_quantize_rows,
                              rotate_quantize_rows_float, small_ops_in_c, write_kv)

__all__ = ["attention", "dequantize_rows", "fused_linear", "fused_prologue", "gather_kv", "Int8WeightForms",
           "int8_gemm_in_float", "int8_linear_rows", "int8_matmul", "paged_decode_attention", "paged_prefill_attention",
           "quantize_rows", "quantize_rows_float", "rms_scale", "rope_heads_", "rotate_quantize_rows",
           "rotate_quantize_rows_float", "small_ops_in_c", "write_kv"]
