"""A batched, differentiable forward of ``model.transformer`` with int8 rounding faked (STE).

The serving Transformer holds int8 buffers and runs one flattened sequence at a time: good
for serving, useless for gradients. This is the same arithmetic over float weights
(Hugging Face names, as ``model.loader`` builds from) for [B, T] token batches. Tensors in
``trainable`` are rounded afresh each step; every other weight is rounded once, up front.
The same code with quantization off is the (GQA, all-global) teacher.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from model.config import ModelConfig
from model.distill.fakequant import fake_quant_rows, quantized_linear, served_weight
from model.transformer import Rotary

LORA_A, LORA_B = ":lora_a", ":lora_b"  # suffixes naming a low-rank adapter's factors (delta files use them too)


@dataclass
class LayerIO:
    """What one layer's attention saw and produced: the layer-wise objective's inputs and targets."""

    normed: torch.Tensor  # input_layernorm(x), [B, T, dim]
    attn_out: torch.Tensor  # o_proj output, [B, T, dim]


class FunctionalModel(nn.Module):
    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor], trainable: tuple[str, ...] = (),
                 device: str | torch.device = "cpu", lowrank: dict[str, int] | None = None):
        super().__init__()
        self.config = config
        q = config.quant
        self.w8, self.a8, self.kv8, self.rot = q.weights, q.activations, q.kv, q.weights and q.rotate
        self.params = nn.ParameterDict({_key(n): nn.Parameter(state[n].float().to(device).clone())
                                        for n in trainable})
        # Low-rank adapters: W = base + B @ A, B starting at zero so training starts from ``state``.
        self.lowrank_base = {n: state[n].float().to(device) for n in (lowrank or {})}
        gen = torch.Generator().manual_seed(0)
        for n, rank in (lowrank or {}).items():
            out_dim, in_dim = state[n].shape
            a = torch.randn(rank, in_dim, generator=gen) / in_dim ** 0.5
            self.params[_key(n + LORA_A)] = nn.Parameter(a.to(device))
            self.params[_key(n + LORA_B)] = nn.Parameter(torch.zeros(out_dim, rank, device=device))
        with torch.no_grad():
            self.frozen = {n: self._serve(w.float().to(device), n) for n, w in state.items()
                           if n not in trainable and n not in self.lowrank_base}
        if config.tie_embeddings:
            self.frozen["lm_head.weight"] = self._serve(state["embed_tokens.weight"].float().to(device), "lm_head")
        self.ropes = {b: Rotary(config.head_dim, b, config.max_seq_len).to(device)
                      for b in {config.rope_base(i) for i in range(config.n_layers)}}

    def _serve(self, w: torch.Tensor, name: str) -> torch.Tensor:
        if w.dim() == 1 or not self.w8:
            return w
        if name.startswith("embed_tokens"):
            return fake_quant_rows(w)  # QEmbedding: int8 rows, no rotation
        return served_weight(w, self.rot)

    def w(self, name: str) -> torch.Tensor:
        key = _key(name)
        if name in self.lowrank_base:
            w = self.lowrank_base[name] + self.params[_key(name + LORA_B)] @ self.params[_key(name + LORA_A)]
        elif key in self.params:
            w = self.params[key]
        else:
            return self.frozen[name]
        return served_weight(w, self.rot) if self.w8 and w.dim() == 2 else w

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return quantized_linear(x, self.w(name), self.a8, self.rot)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.norm_eps)
        return self.w(name) * xf

    # -- attention pieces, shared with the layer-wise objective ---------------------------------
    def kv(self, layer: int, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (after RoPE) and V of a KV-producing layer, [B, Hkv, T, D], int8-rounded as the cache holds them."""
        c, (b, t, _) = self.config, normed.shape
        p = f"layers.{layer}.self_attn."
        k = self.linear(normed, p + "k_proj.weight").reshape(b, t, c.n_kv_heads, c.head_dim)
        v = self.linear(normed, p + "v_proj.weight").reshape(b, t, c.n_kv_heads, c.head_dim)
        k = self._rope(layer, k)
        if self.kv8:
            k, v = fake_quant_rows(k), fake_quant_rows(v)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, layer: int, normed: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Layer ``layer``'s attention block output (after o_proj) over the given K/V."""
        c, (b, t, _) = self.config, normed.shape
        p = f"layers.{layer}.self_attn."
        q = self._rope(layer, self.linear(normed, p + "q_proj.weight").reshape(b, t, c.n_heads, c.head_dim))
        mask = attention_mask(t, c.layers[layer].window, normed.device)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kv[0], kv[1], attn_mask=mask,
                                             enable_gqa=c.n_heads != c.n_kv_heads)
        return self.linear(out.transpose(1, 2).reshape(b, t, c.n_heads * c.head_dim), p + "o_proj.weight")

    def _rope(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        rope = self.ropes[self.config.rope_base(layer)]
        cos, sin = rope.cos[:t][None, :, None, :], rope.sin[:t][None, :, None, :]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def forward(self, tokens: torch.Tensor, capture: list[LayerIO] | None = None, logits_from: int = 0) -> torch.Tensor:
        """Logits [B, T - logits_from, vocab] (positions ``logits_from``, ...: the rest still run as context);
        with ``capture``, each layer's attention input and output are appended."""
        c = self.config
        x = self.frozen["embed_tokens.weight"][tokens]
        kvs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in range(c.n_layers):
            p = f"layers.{i}."
            h = self.norm(x, p + "input_layernorm.weight")
            if c.produces_kv(i):
                kvs[i] = self.kv(i, h)
            a = self.attend(i, h, kvs[c.layers[i].kv_source])
            if capture is not None:
                capture.append(LayerIO(h.detach(), a.detach()))
            x = x + a
            h = self.norm(x, p + "post_attention_layernorm.weight")
            gate, up = self.linear(h, p + "mlp.gate_proj.weight"), self.linear(h, p + "mlp.up_proj.weight")
            x = x + self.linear(F.silu(gate) * up, p + "mlp.down_proj.weight")
        x = x[:, logits_from:]
        return self.linear(self.norm(x, "norm.weight"), "lm_head.weight")

    def param(self, name: str) -> nn.Parameter:
        """A trained tensor or adapter factor by its dotted name (``...weight:lora_b``)."""
        return self.params[_key(name)]

    def named_trainables(self) -> list[tuple[str, nn.Parameter]]:
        return [(_name(k), p) for k, p in self.params.items()]

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {_name(k): p.detach().cpu() for k, p in self.params.items()}


def attention_mask(t: int, window: int | None, device) -> torch.Tensor:
    """[T, T] bool: causal, and within ``window`` (a query at p sees keys in (p - window, p])."""
    pos = torch.arange(t, device=device)
    delta = pos[:, None] - pos[None, :]
    allowed = delta >= 0
    return allowed & (delta < window) if window is not None else allowed


def _key(name: str) -> str:
    return name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) in nats at every position."""
    lt, ls = F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)
    return (lt.exp() * (lt - ls)).sum(-1)

