"""The transformer: one definition for Llama-family and shared-KV models.

Tokens arrive flattened ([N], possibly from several sequences); where each token sits
and what it may attend to is the business of the ``KVBackend`` passed in.
"""
from __future__ import annotations

import torch
from torch import nn

import kernels
from model.config import ModelConfig
from model.kv_cache import KVBackend
from model.quant import QEmbedding, QLinear, compute_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean_square = xf.pow(2).mean(-1, keepdim=True)
        if xf.dim() == 2 and kernels.small_ops_in_c(xf, mean_square, self.weight):  # the four ops below, one call
            return kernels.rms_scale(xf, mean_square, self.weight, self.eps)
        xf = xf * torch.rsqrt(mean_square + self.eps)
        return self.weight * xf.to(self.weight.dtype)


class Rotary(nn.Module):
    """RoPE in the Hugging Face layout (rotate the two halves of each head)."""

    def __init__(self, head_dim: int, base: float, max_len: int):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def at(self, positions: torch.Tensor) -> "RopeAt":
        """The rotation of one step's tokens, for every layer of this base (gathered once per step)."""
        half = self.cos.shape[-1] // 2
        sin = self.sin[positions]
        return RopeAt(self.cos[positions][:, None, :], torch.cat([-sin[:, :half], sin[:, half:]], -1)[:, None, :])

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # x: [N, H, D]
        return self.at(positions)(x)


class RopeAt:
    """``x * cos + rotate_half(x) * sin`` with rotate_half's sign folded into ``sin`` (``-a * b`` and
    ``a * -b`` are the same float), and the halves swapped by ``roll``: four ops a call, not ten."""

    def __init__(self, cos: torch.Tensor, signed_sin: torch.Tensor):
        self.cos, self.signed_sin = cos, signed_sin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * self.cos + xf.roll(x.shape[-1] // 2, -1) * self.signed_sin).to(x.dtype)

    def rotate_heads_(self, rows: torch.Tensor, heads: int) -> None:
        """This rotation in place on the first ``heads`` heads of each row [N, W] (a fused projection's Q, then K):
        one C call where ``kernels.small_ops_in_c``, the same bits as ``self`` on those heads."""
        if kernels.small_ops_in_c(rows, self.cos, self.signed_sin):
            kernels.rope_heads_(rows, heads, self.cos, self.signed_sin)
            return
        part = rows[:, :heads * self.cos.shape[-1]].view(rows.shape[0], heads, -1)
        part.copy_(self(part))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        spec = config.layers[layer]
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = spec.window
        self.group = config.group_of_layer(layer)
        self.produces_kv = config.produces_kv(layer)
        q = config.quant
        # Q, K and V read the same input: one fused projection (one quantization, one GEMM).
        # A layer that reads another layer's KV has Q alone.
        self.q_width = config.n_heads * config.head_dim
        kv_width = 2 * config.n_kv_heads * config.head_dim if self.produces_kv else 0
        self.qkv_proj = QLinear(config.dim, self.q_width + kv_width, q)
        self.o_proj = QLinear(config.n_heads * config.head_dim, config.dim, q)

    def forward(self, x: torch.Tensor, rope: RopeAt, kv: KVBackend) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        rope.rotate_heads_(qkv, self.n_heads + (self.n_kv_heads if self.produces_kv else 0))  # Q's heads, then K's
        q = qkv[:, :self.q_width].reshape(n, self.n_heads, self.head_dim)
        if self.produces_kv:
            k, v = qkv[:, self.q_width:].reshape(n, 2, self.n_kv_heads, self.head_dim).unbind(1)
            kv.store(self.group, k, v)
        out = kv.attend(self.group, q, self.window)
        return self.o_proj(out.reshape(n, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        q = config.quant
        self.ffn_dim = config.ffn_dim
        self.gate_up_proj = QLinear(config.dim, 2 * config.ffn_dim, q)  # fused, as Q/K/V
        self.down_proj = QLinear(config.ffn_dim, config.dim, q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.ffn_dim, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        dtype = compute_dtype(config.quant)
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, rope: RopeAt, kv: KVBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dtype = compute_dtype(config.quant)
        self.embed_tokens = QEmbedding(config.vocab_size, config.dim, config.quant)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, dtype)
        self.lm_head = QLinear(config.dim, config.vocab_size, config.quant)
        bases = sorted({config.rope_base(i) for i in range(config.n_layers)})
        self.ropes = nn.ModuleDict({_rope_key(b): Rotary(config.head_dim, b, config.max_seq_len) for b in bases})
        self._layer_rope = [self.ropes[_rope_key(config.rope_base(i))] for i in range(config.n_layers)]

    def forward(self, tokens: torch.Tensor, kv: KVBackend, logits_at: torch.Tensor | None = None,
                check_tokens: bool = True) -> torch.Tensor:
        """Logits [len(logits_at) or N, vocab] in float32 for the tokens [N] of this step.
        ``check_tokens=False`` skips the range check (a host sync), for callers that checked already."""
        if check_tokens and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        x = self.embed_tokens(tokens)
        at = {id(rope): rope.at(kv.positions) for rope in self.ropes.values()}
        for layer, rope in zip(self.layers, self._layer_rope):
            x = layer(x, at[id(rope)], kv)
        if logits_at is not None:
            if logits_at.numel() == 0:
                return x.new_zeros((0, self.config.vocab_size), dtype=torch.float32)
            x = x[logits_at]
        return self.lm_head(self.norm(x)).float()


def _rope_key(base: float) -> str:
    return f"theta_{int(base)}" if float(base).is_integer() else f"theta_{base}".replace(".", "_")
