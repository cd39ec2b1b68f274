"""int8 layers: weights per output channel, activations per token, outliers tamed.

Per-token int8 activations fail where a few input channels carry huge values (SmolLM2's
MLP down-projection most of all). Two remedies, both exact in float arithmetic:
a Hadamard rotation of the input channels (QuaRot: ``x @ H`` with ``W @ H``, H orthonormal)
spreads every outlier over a whole block, and SmoothQuant's per-channel scaling migrates
range from activations to weights. Measured on SmolLM2 (BENCHMARKS.md), rotation alone
lifts full-int8 top-1 agreement with fp32 from ~85% to ~96%, so it is the default.

A layer is built in its final form from the config (float, or int8 buffers), so an int8
checkpoint loads straight into it; ``load_float`` quantizes float weights on the way in.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import kernels
from model.config import QuantConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(quant: QuantConfig) -> torch.dtype:
    return _DTYPES[quant.compute]


class QLinear(nn.Module):
    """``y = x @ W.T`` with W int8 per output channel and x int8 per token when the config says so.

    ``inv_smooth`` divides the input channels (SmoothQuant): outlier channels of x are
    scaled down and the matching weight columns up before quantization, so neither side
    has to hold a huge range in 8 bits.
    """

    def __init__(self, in_features: int, out_features: int, quant: QuantConfig):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.int8_weights, self.int8_activations = quant.weights, quant.activations
        self.dtype = compute_dtype(quant)
        self.rotation_block: int | None = None  # Hadamard block of the input rotation, None: no rotation
        if self.int8_weights:
            self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
            self.register_buffer("inv_smooth", torch.ones(in_features, dtype=torch.float32))
            if quant.rotate:
                self.rotation_block = hadamard_block(in_features)
        else:
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=self.dtype), requires_grad=False)
        self._derived: dict[str, tuple[tuple, object]] = {}  # values made from buffers: see _derive

    @torch.no_grad()
    def load_float(self, weight: torch.Tensor, smooth: torch.Tensor | None = None) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {self.out_features}x{self.in_features} layer")
        if not self.int8_weights:
            self.weight.copy_(weight.to(self.dtype))
            return
        w = weight.float()
        if smooth is not None:
            w = w * smooth[None, :]
            self.inv_smooth.copy_(1.0 / smooth)
        w = self._rotate(w)
        q, scale = kernels.quantize_rows(w)
        self.weight_q.copy_(q)
        self.weight_scale.copy_(scale.squeeze(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.int8_weights:
            x = x.float() * self.inv_smooth if self._smoothed() else x.float()
            if self.int8_activations:
                y = self._int8_gemm(x)
            else:
                y = F.linear(self._rotate(x).to(self.dtype), self._float_weight())
        else:
            if self.int8_activations:
                x = kernels.dequantize_rows(*kernels.quantize_rows(x), dtype=self.dtype)
            y = F.linear(x, self.weight)
        return y.reshape(*shape[:-1], self.out_features)

    def _int8_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate, quantize per row, exact int8 GEMM, rescale. The first two are one fused call where
        ``kernels.fused_prologue`` says (a C loop on CPU, a Triton kernel on GPU: the torch ops' bits,
        a fraction of the calls and memory passes)."""
        if self.rotation_block is not None and kernels.fused_linear(x):  # few rows: prologue and GEMM in one C call
            return kernels.int8_linear_rows(x, self.rotation_block, self.weight_q, self.weight_scale).to(
                self.dtype)
        in_float = kernels.int8_gemm_in_float(x)
        if self.rotation_block is not None and kernels.fused_prologue(x):
            xq, xs = kernels.rotate_quantize_rows(x, self.rotation_block, in_float)
        else:
            x = self._rotate(x)
            xq, xs = kernels.quantize_rows_float(x) if in_float else kernels.quantize_rows(x)
        forms = self._int8_forms() if x.is_cpu else None  # the CPU routes, and the C epilogue of torch._int_mm's
        return kernels.int8_matmul(xq, xs, self.weight_q, self.weight_scale, out_dtype=self.dtype, forms=forms)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Blockwise ``x @ H`` over the last dimension (H is symmetric, so W @ H rotates the columns alike)."""
        return x if self.rotation_block is None else hadamard_rotate(x, self.rotation_block)

    def _derive(self, name: str, sources: tuple[torch.Tensor, ...], make):
        """``make()``, remembered until a source changes in place (``copy_``, a state dict loaded into
        the layer), is replaced or moves: the layer's derived tensors can never go stale."""
        key = tuple((t.device, t.data_ptr(), t._version) for t in sources)
        held = self._derived.get(name)
        if held is None or held[0] != key:
            held = self._derived[name] = (key, make())
        return held[1]

    def _float_weight(self) -> torch.Tensor:
        return self._derive("dequantized", (self.weight_q, self.weight_scale), lambda: kernels.dequantize_rows(
            self.weight_q, self.weight_scale[:, None], self.dtype))

    def _int8_forms(self) -> kernels.Int8WeightForms:
        """The int8 weight's copies for the CPU routes (kernels.cpu_gemm: float32, packed), each made on first
        use, so a process pays the memory of only the routes its plan takes."""
        return self._derive("cpu_forms", (self.weight_q,), lambda: kernels.Int8WeightForms(self.weight_q))

    def _smoothed(self) -> bool:
        """Whether ``inv_smooth`` is other than all ones (a multiply per call saved when not)."""
        return self._derive("smoothed", (self.inv_smooth,), lambda: bool((self.inv_smooth != 1).any()))


class QEmbedding(nn.Module):
    """Token embedding whose table is int8 per row when weights are int8."""

    def __init__(self, vocab: int, dim: int, quant: QuantConfig):
        super().__init__()
        self.vocab, self.dim = vocab, dim
        self.int8 = quant.weights
        self.dtype = compute_dtype(quant)
        if self.int8:
            self.register_buffer("weight_q", torch.zeros(vocab, dim, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(vocab, dtype=torch.float32))
        else:
            self.weight = nn.Parameter(torch.zeros(vocab, dim, dtype=self.dtype), requires_grad=False)

    @torch.no_grad()
    def load_float(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.vocab, self.dim):
            raise ValueError(f"embedding of shape {tuple(weight.shape)} for {self.vocab}x{self.dim}")
        if self.int8:
            q, scale = kernels.quantize_rows(weight)
            self.weight_q.copy_(q)
            self.weight_scale.copy_(scale.squeeze(-1))
        else:
            self.weight.copy_(weight.to(self.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return kernels.dequantize_rows(self.weight_q[tokens], self.weight_scale[tokens, None], self.dtype)
        return self.weight[tokens]


def hadamard_block(n: int, cap: int = 512) -> int:
    """The largest power of two that divides ``n``, at most ``cap``: the rotation's block size."""
    b = 1
    while n % (2 * b) == 0 and 2 * b <= cap:
        b *= 2
    return b


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size ``n`` (a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


_BUTTERFLY: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def hadamard_rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ hadamard(block)`` on each ``block``-wide slice of the last dimension, as a fast Walsh-Hadamard transform.

    A float matmul's summation order depends on how many rows it is given (BLAS picks other
    kernels for 1 row than for 32), so the int8 rounding that follows would depend on the
    batch. Each butterfly pass here is one exact-order add/sub per element (``a + c*(+-1)``:
    one rounding, whatever the row count or device), so every row comes out the same alone or
    batched. Same signs as ``hadamard`` (Sylvester order), so weights rotated by either agree.
    """
    key = (x.dtype, x.device)
    if key not in _BUTTERFLY:
        _BUTTERFLY[key] = torch.tensor([1.0, -1.0], dtype=x.dtype, device=x.device).view(2, 1)
    signs = _BUTTERFLY[key]
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    y = rows.t().contiguous() if m > 1 else rows  # channels outer: every pass runs over >= m contiguous values
    half = block // 2
    while half >= 1:  # pair channel j with j + half inside each run of 2*half: (a, c) -> (a + c, a - c)
        pairs = y.view(-1, 2, half * m)
        y = torch.addcmul(pairs[:, :1], pairs[:, 1:], signs)
        half //= 2
    y = y.view(-1, m)
    return (y.t() * block**-0.5).contiguous().view(x.shape) if m > 1 else (y * block**-0.5).view(x.shape)


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float,
                      outlier_ratio: float = 8.0) -> torch.Tensor | None:
    """SmoothQuant's ``s_j = max|X_j|^a / max|W_j|^(1-a)``, or None where no channel stands out.

    A layer needs smoothing only when a few input channels dwarf the rest; elsewhere
    per-token int8 already covers the range and smoothing would only move error around.
    """
    act = act_absmax.float().clamp_min(1e-5)
    if act.max() < outlier_ratio * act.median():
        return None
    w = weight.float().abs().amax(dim=0).clamp_min(1e-5)
    return (act.pow(alpha) / w.pow(1 - alpha)).clamp_min(1e-5)
