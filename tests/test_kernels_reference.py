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


def _paged_setup(g, b=5, bs=16, hkv=2, d=16, max_len=150, min_len=1):
    lens = torch.randint(min_len, max_len, (b,), generator=g)
    nblk = int((lens + bs - 1).div(bs, rounding_mode="floor").sum())
    k = torch.randn(nblk, bs, hkv, d, generator=g)
    v = torch.randn(nblk, bs, hkv, d, generator=g)
    kq, ks = kernels.quantize_rows(k)
    vq, vs = kernels.quantize_rows(v)
    order = torch.randperm(nblk, generator=g).tolist()  # shuffled physical blocks
    tables, at = [], 0
    for n in lens.tolist():
        m = (n + bs - 1) // bs
        tables.append(order[at:at + m])
        at += m
    width = max(map(len, tables))
    table = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
    return lens, kq, vq, ks, vs, table


def test_paged_decode_attention_matches_dense_attention_over_the_same_kv(monkeypatch):
    g = torch.Generator().manual_seed(3)
    lens, kq, vq, ks, vs, table = _paged_setup(g)
    bs, hkv, d = kq.shape[1], kq.shape[2], kq.shape[3]
    q = torch.randn(len(lens), 6, d, generator=g)
    for window in (None, 7, 40, 1000):
        got = kernels.paged_decode_attention(q, kq, vq, ks, vs, table, lens, window)
        monkeypatch.setattr(kernels.reference, "DECODE_SLICE_BYTES", 1)  # one sequence per slice
        sliced = kernels.paged_decode_attention(q, kq, vq, ks, vs, table, lens, window)
        monkeypatch.undo()
        for i, n in enumerate(lens.tolist()):
            pos = torch.arange(n)
            slots = table[i][pos // bs] * bs + pos % bs
            k = kernels.dequantize_rows(kq.view(-1, hkv, d)[slots], ks.view(-1, hkv, 1)[slots])
            v = kernels.dequantize_rows(vq.view(-1, hkv, d)[slots], vs.view(-1, hkv, 1)[slots])
            expected = kernels.attention(q[i:i + 1], k, v, pos[-1:], pos, window)[0]
            torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(sliced[i], expected, rtol=1e-4, atol=1e-5)


def test_paged_decode_attention_never_reads_blocks_outside_the_window():
    g = torch.Generator().manual_seed(4)
    lens, kq, vq, ks, vs, table = _paged_setup(g, b=3, max_len=200, min_len=100)
    q = torch.randn(3, 4, kq.shape[3], generator=g)
    expected = kernels.paged_decode_attention(q, kq, vq, ks, vs, table, lens, 20)
    damaged = table.clone()
    bs = kq.shape[1]
    for i, n in enumerate(lens.tolist()):
        damaged[i, : (n - 20) // bs] = -1  # blocks wholly before the window are gone
    torch.testing.assert_close(kernels.paged_decode_attention(q, kq, vq, ks, vs, damaged, lens, 20), expected)
