"""The torch reference kernels against plain computations no one here tuned."""
import torch

import kernels


def test_int8_matmul_is_exact_integer_accumulation():
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-127, 128, (33, 96), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(33, 1, generator=g), torch.rand(40, generator=g)
    exact = (xq.long() @ wq.long().T).double() * xs.double() * ws.double()
    got = kernels.int8_matmul(xq, xs, wq, ws)
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6)
    # rows are independent of batching
    assert torch.equal(kernels.int8_matmul(xq[:1], xs[:1], wq, ws), got[:1])


def test_quantize_rows_round_trip_error_is_half_a_step():
    x = torch.randn(20, 64) * torch.logspace(-2, 2, 20)[:, None]
    q, s = kernels.quantize_rows(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert bool(((kernels.dequantize_rows(q, s) - x).abs() <= s / 2 + 1e-7).all())


def test_attention_matches_sdpa_with_a_window_mask():
    g = torch.Generator().manual_seed(1)
    tq, tk, h, hkv, d, window = 5, 19, 8, 2, 16, 7
    q, k, v = torch.randn(tq, h, d, generator=g), torch.randn(tk, hkv, d, generator=g), torch.randn(tk, hkv, d, generator=g)
    q_pos, k_pos = torch.arange(tk - tq, tk), torch.arange(tk)
    got = kernels.attention(q, k, v, q_pos, k_pos, window)
    mask = (k_pos[None] <= q_pos[:, None]) & (k_pos[None] > q_pos[:, None] - window)
    rep = h // hkv
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1),
        attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
