"""The Triton kernels against their torch references, on CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` must be in the environment before a kernel is decorated, i.e.
before ``kernels.triton_*`` is first imported; nothing else imports those modules. The
interpreter runs tl.dot in numpy: int8 and fp32 are exact there (bf16 dots are not
emulated faithfully), so the attention tests run fp32 queries over int8 KV.

On a GPU (``PDSERVE_TEST_DEVICE=cuda``, as the device session runs them) the same tests run
the compiled kernels: every CPU tensor a test hands a kernel is copied to the device, and
results and written-to arguments are copied back, so the references stay on the CPU.
"""
import os

DEVICE = os.environ.get("PDSERVE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels import checks, dispatch, reference  # noqa: E402
from kernels import triton_attention as _ta  # noqa: E402
from kernels import triton_gemm as _tg  # noqa: E402
from kernels import triton_kv as _tk  # noqa: E402

if DEVICE == "cpu" and type(_tg._w8a8_kernel).__name__ != "InterpretedFunction":  # tests hand kernels CPU tensors
    pytest.skip("the Triton kernels are compiled, not interpreted: TRITON_INTERPRET is not 1, or kernels.triton_*"
                " was imported before it was set", allow_module_level=True)
if DEVICE != "cpu" and not torch.cuda.is_available():
    pytest.skip(f"PDSERVE_TEST_DEVICE={DEVICE} but torch sees no CUDA device", allow_module_level=True)

cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="hands CPU tensors to the kernels through dispatch")


class _OnDevice:
    """A kernel module whose functions take CPU tensors: moved to DEVICE for the call, results and
    arguments (the kernels write some in place) copied back afterwards."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        f = getattr(self._module, name)
        if DEVICE == "cpu" or name.startswith("_") or not callable(f):
            return f

        def call(*args, **kwargs):
            moved = {}

            def to(x):
                if isinstance(x, torch.Tensor) and x.device.type == "cpu":
                    moved[id(x)] = (x, x.to(DEVICE))
                    return moved[id(x)][1]
                return x

            out = f(*map(to, args), **{k: to(v) for k, v in kwargs.items()})
            for orig, dev in moved.values():
                orig.copy_(dev.cpu())
            if isinstance(out, tuple):
                return tuple(o.cpu() for o in out)
            return out.cpu() if isinstance(out, torch.Tensor) else out

        return call


ta, tg, tk = _OnDevice(_ta), _OnDevice(_tg), _OnDevice(_tk)


def _rand_int8(g, *shape):
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


# -- W8A8 GEMM and activation quantization --------------------------------------------------------
@pytest.mark.parametrize("m,n,k", [(1, 16, 16), (17, 40, 96), (33, 50, 100), (64, 32, 160)])
def test_int8_gemm_accumulates_exactly_and_scales_like_the_reference(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    xq, wq = _rand_int8(g, m, k), _rand_int8(g, n, k)
    xs, ws, bias = torch.rand(m, 1, generator=g), torch.rand(n, generator=g), torch.randn(n, generator=g)
    acc = tg.int8_matmul(xq, xs, wq, ws, out_dtype=torch.int32)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), xq.long() @ wq.long().T)
    for b in (None, bias):
        got = tg.int8_matmul(xq, xs, wq, ws, b)
        torch.testing.assert_close(got, reference.int8_matmul(xq, xs, wq, ws, b), rtol=1e-6, atol=1e-5)
    got = tg.int8_matmul(xq, xs, wq, ws, bias, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference.int8_matmul(xq, xs, wq, ws, bias, torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_int8_gemm_reads_a_transposed_weight_view_through_its_strides():
    g = torch.Generator().manual_seed(5)
    xq, w_t = _rand_int8(g, 20, 48), _rand_int8(g, 48, 24)  # wq = w_t.T: a non-contiguous [N, K]
    acc = tg.int8_matmul(xq, torch.ones(20, 1), w_t.T, torch.ones(24), out_dtype=torch.int32)
    assert torch.equal(acc.long(), xq.long() @ w_t.long())


@pytest.mark.parametrize("shape", [(7, 300), (2, 3, 64), (3, 5000)])
def test_quantize_rows_is_bit_identical_to_the_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])[torch.randperm(shape[-1], generator=g)]
    q, s = tg.quantize_rows(x)
    rq, rs = reference.quantize_rows(x)
    assert q.shape == rq.shape and s.shape == rs.shape
    assert torch.equal(q, rq) and torch.equal(s, rs)


def test_quantize_rows_rounds_ties_to_even_like_torch_round():
    x = torch.tensor([[127.0, 2.5, -2.5, 3.5, 0.5, -1.5, 126.5] + [0.0] * 9])  # scale is exactly 1
    q, s = tg.quantize_rows(x)
    assert float(s) == 1.0
    assert q[0, :7].tolist() == [127, 2, -2, 4, 0, -2, 126]
    assert torch.equal(q, reference.quantize_rows(x)[0])


def test_quantize_rows_of_bf16_input_matches_the_reference():
    x = (torch.randn(4, 80, generator=torch.Generator().manual_seed(9)) * 3).to(torch.bfloat16)
    q, s = tg.quantize_rows(x)
    rq, rs = reference.quantize_rows(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("m,k,block", [(1, 64, 64), (5, 576, 64), (3, 1024, 512), (4, 96, 32), (2, 16, 1)])
def test_rotate_quantize_rows_is_bit_identical_to_the_torch_butterflies_then_quantize(m, k, block):
    from model.quant import hadamard_rotate

    g = torch.Generator().manual_seed(m * k + block)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)[torch.randperm(k, generator=g)]
    q, s = tg.rotate_quantize_rows(x, block)
    rq, rs = reference.quantize_rows(hadamard_rotate(x, block))
    assert q.shape == rq.shape and s.shape == rs.shape
    assert torch.equal(q, rq) and torch.equal(s, rs)
    if block > 1:  # and it does rotate: quantizing x unrotated gives other codes
        assert not torch.equal(q, reference.quantize_rows(x)[0])


def test_rotate_quantize_rows_of_bf16_input_and_its_errors():
    from model.quant import hadamard_rotate

    x = (torch.randn(3, 128, generator=torch.Generator().manual_seed(4)) * 3).to(torch.bfloat16)
    q, s = tg.rotate_quantize_rows(x, 128)
    rq, rs = reference.quantize_rows(hadamard_rotate(x.float(), 128))
    assert torch.equal(q, rq) and torch.equal(s, rs)
    for bad, block in ((torch.zeros(2, 96), 64), (torch.zeros(2, 96), 48), (torch.zeros(96), 32)):
        with pytest.raises(checks.KernelInputError, match=r"^x: shape .* rotation block"):
            tg.rotate_quantize_rows(bad, block)


@cpu_only
def test_an_int8_linear_on_the_triton_path_gives_the_same_bits_with_the_fused_prologue(monkeypatch):
    from model.config import QuantConfig
    from model.quant import QLinear

    layer = QLinear(256, 48, QuantConfig())
    layer.load_float(torch.randn(48, 256, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(6))
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)  # what a CUDA tensor gets
    calls = []
    real = _tg.rotate_quantize_rows
    monkeypatch.setattr(_tg, "rotate_quantize_rows", lambda *a: calls.append(a) or real(*a))
    fused = layer(x)
    monkeypatch.setenv("PDSERVE_TRITON_PROLOGUE", "off")
    unfused = layer(x)
    assert len(calls) == 1 and torch.equal(fused, unfused)


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


def test_gemm_and_write_kv_reject_bad_input_naming_the_argument():
    xq, wq = torch.zeros(4, 32, dtype=torch.int8), torch.zeros(8, 32, dtype=torch.int8)
    xs, ws = torch.ones(4, 1), torch.ones(8)
    with pytest.raises(checks.KernelInputError, match=r"^wq: shape \[8, 48\], expected \[\*, 32\]"):
        tg.int8_matmul(xq, xs, torch.zeros(8, 48, dtype=torch.int8), ws)
    with pytest.raises(checks.KernelInputError, match=r"^xq: dtype torch.float32"):
        tg.int8_matmul(xq.float(), xs, wq, ws)
    with pytest.raises(checks.KernelInputError, match=r"^x_scale: shape \[3, 1\]"):
        tg.int8_matmul(xq, torch.ones(3, 1), wq, ws)
    with pytest.raises(checks.KernelInputError, match=r"^w_scale: dtype torch.float16"):
        tg.int8_matmul(xq, xs, wq, ws.half())
    with pytest.raises(checks.KernelInputError, match=r"^bias: shape \[4\]"):
        tg.int8_matmul(xq, xs, wq, ws, torch.zeros(4))
    with pytest.raises(checks.KernelInputError, match=rf"^w_scale is on meta but xq is on {DEVICE}"):
        tg.int8_matmul(xq, xs, wq, torch.ones(8, device="meta"))
    pools = [torch.zeros(2, 16, 1, 16, dtype=torch.int8) for _ in range(2)] + [torch.zeros(2, 16, 1, 1) for _ in range(2)]
    k = torch.randn(3, 1, 16)
    with pytest.raises(checks.KernelInputError, match=r"^slots\[2\] = 32 is outside \[0, 31\]"):
        tk.write_kv(*pools, k, k, torch.tensor([0, 5, 32]))
    with pytest.raises(checks.KernelInputError, match=r"^v: shape"):
        tk.write_kv(*pools, k, k[:2], torch.tensor([0, 5, 6]))
    with pytest.raises(checks.KernelInputError, match=r"^block_size \(k_pool.shape\[1\]\) = 12"):
        tk.write_kv(*[p[:, :12] for p in pools], k, k, torch.tensor([0, 5, 6]))


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


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects (it let a non-constexpr global through once)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "kernels.triton_aot"], env=env, capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0 and "FAIL" not in done.stdout, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("ok ") >= 9


def test_importing_kernels_does_not_import_triton():
    code = "import sys, kernels, kernels.dispatch; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("splits, k", [(2, 96), (3, 96), (4, 100), (8, 64)])
def test_split_k_gives_the_unsplit_bits(splits, k):
    """K split across programs (int32 partials, then one summing kernel with the epilogue): the exact integers
    and, scaled, the unsplit kernel's bits; more splits than K steps fold into fewer."""
    g = torch.Generator().manual_seed(splits * 100 + k)
    m, n = 5, 40
    xq, wq = _rand_int8(g, m, k), _rand_int8(g, n, k)
    xs, ws, bias = torch.rand(m, 1, generator=g), torch.rand(n, generator=g), torch.randn(n, generator=g)
    def run(dt):
        return tg.int8_matmul(xq, xs, wq, ws, bias if dt != torch.int32 else None, out_dtype=dt)

    dtypes = (torch.float32, torch.int32, torch.bfloat16)
    plain = {dt: run(dt) for dt in dtypes}
    _tg.TILES[(m, n, k)] = dict(_tg._tiles(m, n, k, torch.device("cpu")), SPLIT_K=splits)
    try:
        for dt in dtypes:
            assert torch.equal(run(dt), plain[dt]), dt
        assert torch.equal(plain[torch.int32].long(), xq.long() @ wq.long().T)
    finally:
        _tg.TILES.pop((m, n, k))
