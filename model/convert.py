"""Conversion of a GQA all-global Llama checkpoint to the shared-KV form.

K/V heads are mean-pooled (the GQA paper's conversion) down to the target's KV heads;
a layer that reads another layer's KV keeps only its Q/O projections. The result is
untrained: its quality is whatever ``model.quality`` measures, never assumed.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig


def to_shared_kv(state: dict[str, torch.Tensor], target: ModelConfig) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if ".self_attn.k_proj." not in k and ".self_attn.v_proj." not in k}
    for layer in range(target.n_layers):
        if not target.produces_kv(layer):
            continue
        for proj in ("k_proj", "v_proj"):
            key = f"layers.{layer}.self_attn.{proj}.weight"
            if key not in state:
                raise ValueError(f"source weights lack {key!r}")
            out[key] = pool_kv_heads(state[key], target.head_dim, target.n_kv_heads)
    return out


def pool_kv_heads(weight: torch.Tensor, head_dim: int, n_kv_heads: int) -> torch.Tensor:
    """Average groups of adjacent KV heads of a [n_src*head_dim, dim] projection into n_kv_heads."""
    n_src = weight.shape[0] // head_dim
    if n_src % n_kv_heads:
        raise ValueError(f"cannot pool {n_src} KV heads into {n_kv_heads}")
    per = n_src // n_kv_heads
    return weight.reshape(n_kv_heads, per, head_dim, -1).mean(dim=1).reshape(n_kv_heads * head_dim, -1)
