"""The cheap objective first: each attention block matches the teacher's, given the teacher's inputs.

With the teacher's normed hidden states as inputs, every KV group trains independently
of the others and no MLP or LM head runs: per step it costs a fraction of an end-to-end
step on a CPU, and it moves the converted K/V/Q to where the end-to-end KL can finish.
The loss is each layer's squared error relative to the teacher output's energy, summed.
"""
from __future__ import annotations

import torch

from model.distill.student import FunctionalModel, LayerIO


@torch.no_grad()
def capture(teacher: FunctionalModel, rows: torch.Tensor, batch: int = 4,
            dtype: torch.dtype = torch.bfloat16) -> list[LayerIO]:
    """Teacher attention inputs/outputs of every layer for ``rows`` [n, T], kept in ``dtype`` to save memory."""
    per_layer: list[list[LayerIO]] = [[] for _ in range(teacher.config.n_layers)]
    for i in range(0, len(rows), batch):
        cap: list[LayerIO] = []
        teacher(rows[i:i + batch], capture=cap)
        for layer, io in enumerate(cap):
            per_layer[layer].append(LayerIO(io.normed.to(dtype), io.attn_out.to(dtype)))
    return [LayerIO(torch.cat([io.normed for io in ios]), torch.cat([io.attn_out for io in ios]))
            for ios in per_layer]


def layerwise_loss(student: FunctionalModel, target: list[LayerIO], index: torch.Tensor) -> torch.Tensor:
    """Sum over layers of ||student attention(teacher input) - teacher attention||^2 / ||teacher attention||^2."""
    c = student.config
    total = torch.zeros(())
    kvs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in range(c.n_layers):
        h = target[layer].normed[index].float()
        if c.produces_kv(layer):
            kvs[layer] = student.kv(layer, h)
        want = target[layer].attn_out[index].float()
        got = student.attend(layer, h, kvs[c.layers[layer].kv_source])
        total = total + (got - want).pow(2).sum() / want.pow(2).sum().clamp_min(1e-12)
    return total
