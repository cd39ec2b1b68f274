"""The Triton paged-KV kernels (writing KV, decode and prefill attention over int8 blocks), their bad input, and
dispatch's routing to them, against the torch references: on CPU under Triton's interpreter or on a GPU
(``PDSERVE_TEST_DEVICE=cuda``): see ``triton_device``."""
import pytest
import torch

from triton_device import cpu_only, ta, tk  # first: sets TRITON_INTERPRET, or skips

from kernels import checks, dispatch, reference
from kernels import triton_attention as _ta


# -- paged KV --------------------------------------------------------------------------------------
def _pools(g, nb, bs, hkv, d):
    k, v = torch.randn(nb, bs, hkv, d, generator=g), torch.randn(nb, bs, hkv, d, generator=g)
    (kq, ks), (vq, vs) = reference.quantize_rows(k), reference.quantize_rows(v)
    return kq, vq, ks, vs


def _tables(g, lens, bs, nb_extra=3):
    """Shuffled physical blocks (plus a few unused ones), -1 past each sequence's end."""
    need = [(n + bs - 1) // bs for n in lens]
    order = torch.randperm(sum(need) + nb_extra, generator=g).tolist()
    rows, at = [], 0
    for m in need:
        rows.append(order[at:at + m])
        at += m
    width = max(need) + 1
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows]), sum(need) + nb_extra


@pytest.mark.parametrize("hkv", [1, 3])
def test_write_kv_stores_the_reference_codes_and_scales(hkv):
    g = torch.Generator().manual_seed(hkv)
    nb, bs, d, n = 5, 16, 32, 37
    k, v = torch.randn(n, hkv, d, generator=g) * 4, torch.randn(n, hkv, d, generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:n]
    got = [torch.zeros(nb, bs, hkv, d, dtype=torch.int8) for _ in range(2)] + [torch.zeros(nb, bs, hkv, 1) for _ in range(2)]
    want = [t.clone() for t in got]
    tk.write_kv(*got, k, v, slots)
    reference.write_kv(*want, k, v, slots)
    for a, b in zip(got[:2], want[:2]):
        assert torch.equal(a, b)
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def _dense_decode(q, kq, vq, ks, vs, table, lens, window):
    """fp32 attention of each sequence's last token over its dequantized KV (no paging, no int8 tricks)."""
    bs, hkv, d = kq.shape[1], kq.shape[2], kq.shape[3]
    out = []
    for i, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        slots = table[i][pos // bs] * bs + pos % bs
        k = reference.dequantize_rows(kq.view(-1, hkv, d)[slots], ks.view(-1, hkv, 1)[slots])
        v = reference.dequantize_rows(vq.view(-1, hkv, d)[slots], vs.view(-1, hkv, 1)[slots])
        out.append(reference.attention(q[i:i + 1].double(), k.double(), v.double(), pos[-1:], pos, window)[0])
    return torch.stack(out).float()


@pytest.mark.parametrize("h,hkv,bs", [(4, 1, 16), (6, 2, 16), (2, 1, 32)])
def test_paged_decode_attention_matches_fp32_attention_over_the_same_kv(h, hkv, bs):
    g = torch.Generator().manual_seed(h * 10 + hkv)
    lens = [1, 17, bs * 3, 70, 45]
    table, nb = _tables(g, lens, bs)
    kq, vq, ks, vs = _pools(g, nb, bs, hkv, 16)
    lens = torch.tensor(lens)
    q = torch.randn(len(lens), h, 16, generator=g)
    for window in (None, 5, 20, 1000):  # shorter and longer than the contexts
        expected = _dense_decode(q, kq, vq, ks, vs, table, lens, window)
        for splits in (1, 3):  # one pass, and split-K with a log-sum-exp merge (some splits empty)
            got = ta.paged_decode_attention(q, kq, vq, ks, vs, table, lens, window, num_splits=splits)
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_paged_decode_attention_never_reads_blocks_outside_the_window(monkeypatch):
    g = torch.Generator().manual_seed(11)
    lens = [100, 77, 130]
    table, nb = _tables(g, lens, 16)
    kq, vq, ks, vs = _pools(g, nb, 16, 1, 16)
    lens = torch.tensor(lens)
    q = torch.randn(3, 4, 16, generator=g)
    expected = ta.paged_decode_attention(q, kq, vq, ks, vs, table, lens, 20, num_splits=2)
    damaged = table.clone()
    for i, n in enumerate(lens.tolist()):
        damaged[i, : (n - 20) // 16] = -1  # garbage if it were read
    monkeypatch.setenv("PDSERVE_KERNEL_CHECKS", "1")  # and the checks accept what is never read
    got = ta.paged_decode_attention(q, kq, vq, ks, vs, damaged, lens, 20, num_splits=2)
    assert torch.equal(got, expected)


def test_half_precision_queries_take_the_tensor_core_path_within_half_precision_error():
    """fp16 here: bf16 runs the same code, but the interpreter cannot emulate a bf16 tl.dot."""
    g = torch.Generator().manual_seed(13)
    lens = [40, 90]
    table, nb = _tables(g, lens, 16)
    kq, vq, ks, vs = _pools(g, nb, 16, 1, 16)
    lens = torch.tensor(lens)
    q = torch.randn(2, 4, 16, generator=g)
    expected = _dense_decode(q, kq, vq, ks, vs, table, lens, 30)
    for splits in (1, 2):
        got = ta.paged_decode_attention(q.half(), kq, vq, ks, vs, table, lens, 30, num_splits=splits)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=3e-3)
    qp = torch.randn(10, 4, 16, generator=g)
    got = ta.paged_prefill_attention(qp.half(), kq, vq, ks, vs, table[1], 80, 30)
    torch.testing.assert_close(got.float(), reference.paged_prefill_attention(qp, kq, vq, ks, vs, table[1], 80, 30),
                               rtol=1e-2, atol=3e-3)


@pytest.mark.parametrize("h,hkv", [(4, 1), (6, 2)])
def test_paged_prefill_attention_matches_fp32_attention_over_the_same_kv(h, hkv):
    g = torch.Generator().manual_seed(20 + h)
    bs, d = 16, 16
    for start, t in ((0, 21), (37, 12), (50, 1)):  # a first chunk, a chunk after a cached prefix, one token
        table, nb = _tables(g, [start + t], bs)
        kq, vq, ks, vs = _pools(g, nb, bs, hkv, d)
        q = torch.randn(t, h, d, generator=g)
        for window in (None, 6, 30, 500):
            pos = torch.arange(start + t)
            slots = table[0][pos // bs] * bs + pos % bs
            k = reference.dequantize_rows(kq.view(-1, hkv, d)[slots], ks.view(-1, hkv, 1)[slots])
            v = reference.dequantize_rows(vq.view(-1, hkv, d)[slots], vs.view(-1, hkv, 1)[slots])
            expected = reference.attention(q.double(), k.double(), v.double(), pos[start:], pos, window).float()
            got = ta.paged_prefill_attention(q, kq, vq, ks, vs, table[0], start, window)
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


# -- bad input: a clear error naming the argument, before any launch --------------------------------
def _decode_args(hkv=2, h=4):
    g = torch.Generator().manual_seed(0)
    table, nb = _tables(g, [20, 33], 16)
    kq, vq, ks, vs = _pools(g, nb, 16, hkv, 16)
    return dict(q=torch.randn(2, h, 16, generator=g), k_pool=kq, v_pool=vq, k_scale=ks, v_scale=vs,
                block_tables=table, seq_lens=torch.tensor([20, 33]), window=None)


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.zeros(2, 4, 16, dtype=torch.int32)), r"^q: dtype"),
    (dict(q=torch.zeros(2, 4, 32)), r"^q: shape"),
    (dict(q=torch.zeros(2, 3, 16)), r"^q: 3 query heads"),
    (dict(v_pool=torch.zeros(3, 16, 1, 16, dtype=torch.int8)), r"^v_pool: shape"),
    (dict(k_pool=torch.zeros(4, 16, 1, 16)), r"^k_pool: dtype"),
    (dict(k_scale=None), r"^k_scale is None"),
    (dict(seq_lens=torch.tensor([20.0, 33.0])), r"^seq_lens: dtype"),
    (dict(seq_lens=torch.tensor([20, 33, 1])), r"^seq_lens: shape"),
    (dict(seq_lens=torch.tensor([20, 0])), r"^seq_lens\[1\] = 0"),
    (dict(seq_lens=torch.tensor([20, 1000])), r"^seq_lens\[1\] = 1000"),
    (dict(window=0), r"^window = 0"),
    (dict(block_tables=torch.zeros(2, 4, dtype=torch.long, device="meta")), r"^block_tables is on meta"),
])
def test_decode_rejects_bad_input_naming_the_argument(change, message):
    args = {**_decode_args(), **change}
    with pytest.raises(checks.KernelInputError, match=message):
        ta.paged_decode_attention(**args)


def test_block_table_entries_out_of_range_are_caught_where_they_would_be_read():
    args = _decode_args()
    nb = args["k_pool"].shape[0]
    args["block_tables"][1, 2] = nb  # sequence 1 (33 tokens) reads its block 2
    with pytest.raises(checks.KernelInputError, match=rf"block_tables\[1, 2\] = {nb} is not a block id"):
        ta.paged_decode_attention(**args)
    args["block_tables"][1, 2] = -1
    with pytest.raises(checks.KernelInputError, match=r"block_tables\[1, 2\] = -1"):
        ta.paged_decode_attention(**args)
    table = args["block_tables"][0].clone()
    with pytest.raises(checks.KernelInputError, match=r"block_table\[1\] = -1"):  # 20 tokens: blocks 0, 1
        table[1] = -1
        ta.paged_prefill_attention(args["q"][:1].expand(5, -1, -1), args["k_pool"], args["v_pool"],
                                   args["k_scale"], args["v_scale"], table, 15)
    with pytest.raises(checks.KernelInputError, match=r"^block_table: 4 blocks of 16 cannot hold positions up to 70"):
        ta.paged_prefill_attention(args["q"][:1].expand(10, -1, -1), args["k_pool"], args["v_pool"],
                                   args["k_scale"], args["v_scale"], table, 60)


# -- dispatch ----------------------------------------------------------------------------------------
@cpu_only
def test_dispatch_on_cpu_is_exactly_the_reference():
    args = _decode_args(hkv=2, h=6)
    assert not dispatch.use_triton(args["q"])
    got = dispatch.paged_decode_attention(*args.values())
    assert torch.equal(got, reference.paged_decode_attention(*args.values()))
    assert dispatch.int8_matmul is not reference.int8_matmul  # a router, which on CPU returns the reference's bits
    xq, wq = torch.ones(3, 16, dtype=torch.int8), torch.ones(5, 16, dtype=torch.int8)
    assert torch.equal(dispatch.int8_matmul(xq, torch.ones(3, 1), wq, torch.ones(5)),
                       reference.int8_matmul(xq, torch.ones(3, 1), wq, torch.ones(5)))


@cpu_only
def test_dispatch_routes_int8_tensors_to_the_triton_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)  # what a CUDA tensor gets
    args = _decode_args(hkv=2, h=6)
    torch.testing.assert_close(dispatch.paged_decode_attention(*args.values()),
                               reference.paged_decode_attention(*args.values()), rtol=1e-3, atol=1e-4)
    calls = []
    real = _ta.paged_prefill_attention
    monkeypatch.setattr(_ta, "paged_prefill_attention", lambda *a: calls.append(a) or real(*a))
    q = args["q"][:1].expand(4, -1, -1)
    pool = [args[n] for n in ("k_pool", "v_pool", "k_scale", "v_scale")]
    got = dispatch.paged_prefill_attention(q, *pool, args["block_tables"][1], 29, 8)
    assert len(calls) == 1
    torch.testing.assert_close(got, reference.paged_prefill_attention(q, *pool, args["block_tables"][1], 29, 8),
                               rtol=1e-3, atol=1e-4)
    x = torch.randn(3, 40)
    assert all(torch.equal(a, b) for a, b in zip(dispatch.quantize_rows(x), reference.quantize_rows(x)))
