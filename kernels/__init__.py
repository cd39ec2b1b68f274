"""Compute kernels and the one dispatch the model uses.

Every op has a torch reference (``kernels.reference``), which is the CPU path and the
oracle the Triton kernels (GPU, a later issue) are tested against.
"""
from kernels.dispatch import attention, dequantize_rows, int8_matmul, quantize_rows

__all__ = ["attention", "dequantize_rows", "int8_matmul", "quantize_rows"]
