"""Sliding windows and cross-layer KV sharing: the incremental forward against a naive one.

The naive implementation below recomputes every layer over the whole sequence with an
explicit mask, taking each consumer's K/V straight from its source layer's projections.
"""
import math

import pytest
import torch

from model.config import ModelConfig, QuantConfig
from model.kv_cache import ContiguousKVCache
from model.loader import build, random_state
from model.presets import get_preset


def naive_logits(cfg: ModelConfig, w: dict, tokens: torch.Tensor) -> torch.Tensor:
    n, hd = len(tokens), cfg.head_dim
    pos = torch.arange(n)

    def rope(x, base):
        inv = 1.0 / base ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[:, None, :]
        rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * ang.cos() + rot * ang.sin()

    def norm(x, g):
        return g * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    x = w["embed_tokens.weight"][tokens]
    kv = {}
    for i, spec in enumerate(cfg.layers):
        p = f"layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        base = cfg.rope_base(i)
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(n, cfg.n_heads, hd), base)
        if spec.kv_source == i:
            k = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(n, cfg.n_kv_heads, hd), base)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, cfg.n_kv_heads, hd)
            kv[i] = (k, v)
        k, v = kv[spec.kv_source]
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        mask = pos[None, :] <= pos[:, None]
        if spec.window is not None:
            mask &= pos[None, :] > pos[:, None] - spec.window
        att = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, -math.inf).softmax(-1), v)
        x = x + att.reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["embed_tokens.weight"])
    return norm(x, w["norm.weight"]) @ head.T


def incremental_logits(model, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    cache = ContiguousKVCache(model.config, len(tokens))
    with torch.inference_mode():
        out = [model(tokens[:prefill], cache.extend(prefill))]
        for t in tokens[prefill:]:
            out.append(model(t[None], cache.extend(1)))
    return torch.cat(out)


@pytest.mark.parametrize("prefill", [1, 7, 30])
def test_skv_tiny_incremental_equals_naive_full_sequence(prefill):
    cfg = get_preset("skv-tiny").with_quant(QuantConfig.off())
    assert any(s.kv_source != i for i, s in enumerate(cfg.layers))  # sharing is exercised
    w = random_state(cfg, seed=7)
    model = build(cfg, w)
    tokens = torch.randint(0, cfg.vocab_size, (70,), generator=torch.Generator().manual_seed(prefill))
    assert len(tokens) > 2 * min(s.window for s in cfg.layers if s.window)  # windows shorter than the sequence
    expected = naive_logits(cfg, w, tokens)
    got = incremental_logits(model, tokens, prefill)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_window_actually_limits_attention():
    """Tokens that left every window of a purely local model cannot change the next logits."""
    from model.config import LayerSpec

    cfg = ModelConfig(name="local-only", vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                      ffn_dim=64, layers=(LayerSpec("local", 0, 4), LayerSpec("local", 0, 4)),
                      quant=QuantConfig.off())
    model = build(cfg, random_state(cfg, seed=1))
    a = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    b = a.clone()
    b[:2] = torch.tensor([50, 60])  # positions 0, 1 are outside the last query's window of 4 (positions 6..9)
    la, lb = incremental_logits(model, a, 10)[-1], incremental_logits(model, b, 10)[-1]
    torch.testing.assert_close(la, lb)
    c = a.clone()
    c[7] = 33  # inside the window
    assert not torch.allclose(la, incremental_logits(model, c, 10)[-1])


@pytest.mark.parametrize("prefill", [1, 5, 31])
def test_int8_incremental_matches_int8_prefill_bit_for_bit(prefill):
    """Token-by-token decoding and a whole-prompt prefill run the same arithmetic per token.

    int8 activations amplify any last-bit difference in the float work before them into a
    rounding step, so the two orders are compared exactly, not within a tolerance.
    """
    cfg = get_preset("skv-tiny")
    assert cfg.quant == QuantConfig()  # the default precision
    model = build(cfg, random_state(cfg, seed=2))
    tokens = torch.randint(0, cfg.vocab_size, (60,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(incremental_logits(model, tokens, prefill), incremental_logits(model, tokens, len(tokens)))
