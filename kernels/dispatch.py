"""Picks an implementation per call: Triton on CUDA tensors once those kernels exist, else torch.

Only the torch references are here so far (Triton is issue 8); the model calls through
this module so the kernels can be slotted in without touching it.
"""
from __future__ import annotations

from kernels import reference

quantize_rows = reference.quantize_rows
dequantize_rows = reference.dequantize_rows
int8_matmul = reference.int8_matmul
attention = reference.attention
write_kv = reference.write_kv
gather_kv = reference.gather_kv
paged_decode_attention = reference.paged_decode_attention
paged_prefill_attention = reference.paged_prefill_attention
