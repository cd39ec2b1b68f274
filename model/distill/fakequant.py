"""Fake int8 quantization with straight-through gradients: training sees the served int8 form.

Serving (model.quant.QLinear) rotates each linear's input channels blockwise with a
Hadamard matrix H, then quantizes the weight ``W @ H`` per output channel and the input
``x @ H`` per token, both symmetric int8; K and V are int8 per token and KV head. The
functions here round exactly the same way (kernels.reference) but pass gradients through
the rounding unchanged (STE), so a trained weight is good *after* rounding.
"""
from __future__ import annotations

import torch

from kernels import dequantize_rows, quantize_rows
from model.quant import hadamard, hadamard_block

_ROTATIONS: dict[tuple[int, str], torch.Tensor] = {}


def rotation(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The block Hadamard matrix that QLinear uses for an ``n``-wide input."""
    key = (hadamard_block(n), str(device))
    if key not in _ROTATIONS:
        _ROTATIONS[key] = hadamard(key[0]).to(device)
    return _ROTATIONS[key]


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Blockwise ``x @ H`` over the last dimension; H is symmetric and orthonormal, so rotate(rotate(x)) == x."""
    h = rotation(x.shape[-1], x.device)
    b = h.shape[0]
    return (x.reshape(*x.shape[:-1], -1, b) @ h).reshape(x.shape)


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """Round each row (last dim) to symmetric int8 and back; the gradient passes straight through."""
    q, scale = quantize_rows(x.detach())
    return x + (dequantize_rows(q, scale, x.dtype) - x).detach()


def served_weight(w: torch.Tensor, rotate_input: bool = True) -> torch.Tensor:
    """The float weight (in the rotated basis) that int8 serving multiplies by, differentiable via STE."""
    return fake_quant_rows(rotate(w) if rotate_input else w)


def quantized_linear(x: torch.Tensor, w_served: torch.Tensor, act_int8: bool = True,
                     rotate_input: bool = True) -> torch.Tensor:
    """``y = q(x @ H) @ w_served.T``: QLinear's int8 arithmetic, in float with STE."""
    if rotate_input:
        x = rotate(x)
    if act_int8:
        x = fake_quant_rows(x)
    return x @ w_served.t()


def pack_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained float weight as the int8 rows serving will hold (rotated basis) and their scales."""
    q, scale = quantize_rows(rotate(w.detach().float()))
    return q, scale.squeeze(-1)


def unpack_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float weight whose rotated, re-quantized rows are exactly ``q``: QLinear reproduces them bit for bit."""
    return rotate(dequantize_rows(q, scale[:, None]))
