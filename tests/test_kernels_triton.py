"""The Triton W8A8 GEMM and activation quantization against their torch references, on CPU under Triton's
interpreter or on a GPU (``PDSERVE_TEST_DEVICE=cuda``): see ``triton_device``. The paged-KV kernels are in
test_kernels_triton_paged.py."""
import os
import subprocess
import sys

import pytest
import torch

from triton_device import DEVICE, cpu_only, rand_int8, tg, tk  # first: sets TRITON_INTERPRET, or skips

from kernels import checks, dispatch, reference
from kernels import triton_gemm as _tg


# -- W8A8 GEMM and activation quantization --------------------------------------------------------
@pytest.mark.parametrize("m,n,k", [(1, 16, 16), (17, 40, 96), (33, 50, 100), (64, 32, 160)])
def test_int8_gemm_accumulates_exactly_and_scales_like_the_reference(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    xq, wq = rand_int8(g, m, k), rand_int8(g, n, k)
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
    xq, w_t = rand_int8(g, 20, 48), rand_int8(g, 48, 24)  # wq = w_t.T: a non-contiguous [N, K]
    acc = tg.int8_matmul(xq, torch.ones(20, 1), w_t.T, torch.ones(24), out_dtype=torch.int32)
    assert torch.equal(acc.long(), xq.long() @ w_t.long())


@pytest.mark.parametrize("splits, k", [(2, 96), (3, 96), (4, 100), (8, 64)])
def test_split_k_gives_the_unsplit_bits(splits, k):
    """K split across programs (int32 partials, then one summing kernel with the epilogue): the exact integers
    and, scaled, the unsplit kernel's bits; more splits than K steps fold into fewer."""
    g = torch.Generator().manual_seed(splits * 100 + k)
    m, n = 5, 40
    xq, wq = rand_int8(g, m, k), rand_int8(g, n, k)
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


# -- bad input: a clear error naming the argument, before any launch --------------------------------
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


# -- compiling and importing ------------------------------------------------------------------------
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
