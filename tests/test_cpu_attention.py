"""The C attention over int8 paged KV (kernels/cpu_attention.c) gives the torch reference's bits exactly."""
import math
import shutil

import pytest
import torch

import kernels
from kernels import cpu_attention, cpu_fused, reference

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
                              reason="no C compiler: attention falls back to the torch reference")
SHAPES = [(9, 3, 64, 64), (4, 1, 16, 16), (8, 8, 128, 16), (2, 1, 8, 16), (4, 2, 256, 16)]  # h, hkv, d, block


def int8_pools(blocks: int, bs: int, hkv: int, d: int, seed: int):
    """Quantized K/V pools [blocks, bs, Hkv, D] with scales, rows of very different sizes and one all zero."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(blocks * bs, hkv, d, generator=g) * torch.logspace(-3, 1, blocks * bs)[:, None, None]
    v = torch.randn(blocks * bs, hkv, d, generator=g)
    k[5] = 0.0
    (kq, ks), (vq, vs) = reference.quantize_rows(k), reference.quantize_rows(v)
    shape = (blocks, bs, hkv)
    return kq.view(*shape, d), vq.view(*shape, d), ks.view(*shape, 1), vs.view(*shape, 1)


def queries(n: int, h: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, d, generator=g) * 4
    q[0, 0] = 0.0  # an all-zero query row
    return q


@needs_cc
@pytest.mark.parametrize("h, hkv, d, bs", SHAPES)
@pytest.mark.parametrize("window", [None, 24, 64])
def test_decode_matches_the_reference_bit_for_bit(h, hkv, d, bs, window):
    lens = torch.tensor([1, 17, 300, 64, 511, 129])
    width = -(-int(lens.max()) // bs)
    kp, vp, ks, vs = int8_pools(len(lens) * width + 3, bs, hkv, d, seed=d)
    tables = torch.randperm(len(lens) * width + 3, generator=torch.Generator().manual_seed(1))[:len(lens) * width]
    tables = tables.view(len(lens), width)
    q = queries(len(lens), h, d, seed=h)
    got = cpu_attention.paged_decode_attention(q, kp, vp, ks, vs, tables, lens, window)
    assert torch.equal(got, reference.paged_decode_attention(q, kp, vp, ks, vs, tables, lens, window))
    alone = [cpu_attention.paged_decode_attention(q[i:i + 1], kp, vp, ks, vs, tables[i:i + 1], lens[i:i + 1], window)
             for i in range(len(lens))]
    assert torch.equal(got, torch.cat(alone))  # batch invariant


@needs_cc
@pytest.mark.parametrize("h, hkv, d, bs", SHAPES[:3])
@pytest.mark.parametrize("start, t, window", [(0, 37, None), (100, 200, None), (256, 128, 50), (0, 300, 24),
                                              (31, 1, None)])
def test_prefill_matches_the_reference_bit_for_bit(h, hkv, d, bs, start, t, window):
    blocks = -(-(start + t) // bs)
    kp, vp, ks, vs = int8_pools(blocks + 2, bs, hkv, d, seed=start + t)
    table = torch.randperm(blocks + 2, generator=torch.Generator().manual_seed(2))[:blocks]
    q = queries(t, h, d, seed=t)
    got = cpu_attention.paged_prefill_attention(q, kp, vp, ks, vs, table, start, window)
    assert torch.equal(got, reference.paged_prefill_attention(q, kp, vp, ks, vs, table, start, window))


@needs_cc
def test_query_slices_and_threads_do_not_change_a_bit(monkeypatch):
    h, hkv, d, bs = 9, 3, 64, 16
    kp, vp, ks, vs = int8_pools(40, bs, hkv, d, seed=3)
    table = torch.arange(40)
    q = queries(600, h, d, seed=4)
    whole = cpu_attention.paged_prefill_attention(q, kp, vp, ks, vs, table, 10)  # in blocks, one call
    monkeypatch.setenv("PDSERVE_CPU_ATTENTION_TILES", "off")  # one query at a time, in slices:
    monkeypatch.setattr(cpu_attention, "DECODE_SLICE_BYTES", 64 * 1024)  # of a few rows
    monkeypatch.setattr(cpu_attention, "THREADED_MACS", 0)  # every call on all threads
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        sliced = cpu_attention.paged_prefill_attention(q, kp, vp, ks, vs, table, 10)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(sliced, whole)
    assert torch.equal(whole, reference.paged_prefill_attention(q, kp, vp, ks, vs, table, 10))


def prefill_two_ways(monkeypatch, h, hkv, d, bs, start, t, window, threads, seed, second: str):
    """A prefill's attention as the C path takes it, then with the environment variable ``second`` set to off;
    every call split over ``threads`` (THREADED_MACS 0). Returns both and the torch reference's."""
    blocks = -(-(start + t) // bs)
    kp, vp, ks, vs = int8_pools(blocks + 1, bs, hkv, d, seed=t + seed)
    table = torch.randperm(blocks + 1, generator=torch.Generator().manual_seed(3 + seed))[:blocks]
    q = queries(t, h, d, seed=h + t + seed)
    monkeypatch.setattr(cpu_attention, "THREADED_MACS", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = cpu_attention.paged_prefill_attention(q, kp, vp, ks, vs, table, start, window)
        monkeypatch.setenv(second, "off")
        then = cpu_attention.paged_prefill_attention(q, kp, vp, ks, vs, table, start, window)
    finally:
        torch.set_num_threads(before)
    return first, then, reference.paged_prefill_attention(q, kp, vp, ks, vs, table, start, window)


@needs_cc
@pytest.mark.parametrize("h, hkv, d, bs, start, t, window, threads", [
    (9, 3, 64, 64, 0, 512, None, 2), (9, 3, 64, 16, 7, 93, None, 3), (4, 1, 16, 16, 300, 40, 33, 1),
    (8, 8, 128, 16, 0, 4, None, 1), (16, 1, 32, 16, 5, 70, 17, 2), (4, 2, 256, 16, 0, 21, 9, 2)])
def test_prefill_tiles_give_the_one_query_path_s_bits(monkeypatch, h, hkv, d, bs, start, t, window, threads):
    """Many queries of one sequence take cpu_attention_prefill.c's tiles (PDSERVE_CPU_AMX=off: the AVX tiles even
    where AMX is); one query at a time (the decode loops, PDSERVE_CPU_ATTENTION_TILES=off) must give the same bits:
    odd spans, windows, starts inside a block, block and thread splits that do not divide the queries, head groups
    of 1 to 16."""
    monkeypatch.setenv("PDSERVE_CPU_AMX", "off")
    tiled, alone, ref = prefill_two_ways(monkeypatch, h, hkv, d, bs, start, t, window, threads, 0,
                                         "PDSERVE_CPU_ATTENTION_TILES")
    assert torch.equal(tiled, alone)
    assert torch.equal(tiled, ref)


@needs_cc
@pytest.mark.parametrize("h, hkv, d, bs, start, t, window, threads", [
    (9, 3, 64, 64, 0, 512, None, 2), (9, 3, 64, 16, 1000, 300, None, 2), (9, 3, 64, 16, 700, 150, 100, 1),
    (4, 1, 16, 16, 300, 40, 33, 1), (16, 1, 32, 16, 5, 70, 17, 2), (8, 8, 128, 16, 60, 9, None, 1),
    (4, 2, 256, 16, 0, 21, 9, 2)])
def test_amx_tiles_give_the_avx_tiles_bits(monkeypatch, h, hkv, d, bs, start, t, window, threads):
    """Where the CPU has AMX a prefill's attention runs on its tiles (cpu_attention_amx.c: q's grid in 3 or 4 byte
    digits, d = 64 and 128 against 16, 32 and 256; the probability grid in 3 digits plus each row's top bit);
    PDSERVE_CPU_AMX=off keeps the AVX tiles. Spans of many 64-key chunks, windows, starts inside a block."""
    if not cpu_fused.amx():
        pytest.skip("no AMX here (or the library was built without it): the AVX tiles are all there is")
    amx, avx, ref = prefill_two_ways(monkeypatch, h, hkv, d, bs, start, t, window, threads, d, "PDSERVE_CPU_AMX")
    assert torch.equal(amx, avx)
    assert torch.equal(amx, ref)


@needs_cc
def test_a_position_outside_the_block_table_is_a_clear_error():
    kp, vp, ks, vs = int8_pools(8, 16, 1, 16, seed=5)
    q = queries(2, 4, 16, seed=6)
    tables = torch.tensor([[0, 1, -1], [2, 3, 4]])  # sequence 0's third block is not held
    with pytest.raises(ValueError, match="not in the block table"):
        cpu_attention.paged_decode_attention(q, kp, vp, ks, vs, tables, torch.tensor([40, 40]))
    with pytest.raises(ValueError, match="not in the block table"):  # a block id past the pool
        cpu_attention.paged_decode_attention(q[:1], kp, vp, ks, vs, torch.tensor([[0, 99]]), torch.tensor([20]))
    with pytest.raises(ValueError, match="2 queries need 2 block tables"):  # never read past the tables
        cpu_attention.paged_decode_attention(q, kp, vp, ks, vs, torch.tensor([[0, 1]]), torch.tensor([20]))
    with pytest.raises(ValueError, match="sized for"):
        cpu_attention.paged_decode_attention(q[:1], kp, vp, ks, vs, tables[:1], torch.tensor([reference.MAX_KEYS + 1]))
    with pytest.raises(ValueError, match="not in the block table"):  # a prefill's tiles gather through the table too
        cpu_attention.paged_prefill_attention(queries(20, 4, 16, seed=9), kp, vp, ks, vs, torch.tensor([0, -1]), 10)


@needs_cc
def test_the_dispatcher_takes_the_c_path_only_where_it_applies(monkeypatch):
    kp, vp, ks, vs = int8_pools(8, 16, 1, 16, seed=7)
    q = queries(1, 4, 16, seed=8)
    assert cpu_attention.usable(q, kp, ks)
    assert not cpu_attention.usable(q, kp.float(), None)  # float pools: the reference's float grid
    assert not cpu_attention.usable(q.bfloat16(), kp, ks)
    assert not cpu_attention.usable(q[..., :4], kp[..., :4], ks)  # head dim below the int16 grid's reach
    calls = []
    monkeypatch.setattr(cpu_attention, "_attend", lambda *a: calls.append(a) or torch.zeros(1, 4, 16))
    kernels.paged_decode_attention(q, kp, vp, ks, vs, torch.tensor([[0, 1]]), torch.tensor([20]))
    assert len(calls) == 1


@pytest.mark.skipif(not cpu_fused.available(), reason="no C compiler")
def test_the_revision_a_b_builds_both_libraries_and_compares_their_bits(capsys):
    import subprocess

    from benchmarks import c_kernels_vs

    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=c_kernels_vs.ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout: no revision to build")

    c_kernels_vs.main(["--base", "HEAD", "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| prefill", "| decode", "| prol"))]
    assert len(rows) == 11 and all(row.endswith("| True |") for row in rows), rows
    assert cpu_fused.library() is not None  # the process's own library is back


def _exp_inputs() -> torch.Tensor:
    """Every kind of input the softmax's exp meets, and more: zeros of both signs, -inf, NaN, +inf (read as 0),
    both sides of EXP_LOW, ties of the 2**n rounding, subnormal-sized x, and a million values in [-100, 0]."""
    low = reference.EXP_LOW
    edges = [0.0, -0.0, -math.inf, math.inf, 1.0, low, math.nextafter(low, -math.inf),
             math.nextafter(low, 0.0), -1e-40, -1e-7, -100.0] + [-(k + 0.5) * math.log(2) for k in range(126)]
    g = torch.Generator().manual_seed(7)
    return torch.cat([torch.tensor(edges, dtype=torch.float32), -torch.rand(2**20, generator=g) * 100,
                      torch.tensor([math.nan, -1.0])])  # NaN near the end: in a vector or in the tail, by length


@needs_cc
@pytest.mark.parametrize("tail", [0, 3, 7, 11])  # the C loop's 16- and 8-lane vectors, then its scalar tail
def test_the_c_exp_gives_the_reference_s_bits(tail):
    x = _exp_inputs()[tail:]
    y = x.clone()
    cpu_fused.library().pdserve_exp_nonpositive(y.data_ptr(), y.numel())
    ref = reference.exp_nonpositive(x)
    assert torch.equal(y.isnan(), ref.isnan()) and ref.isnan().sum() == 1
    assert torch.equal(y.view(torch.int32)[~ref.isnan()], ref.view(torch.int32)[~ref.isnan()])


def test_the_reference_exp_is_exp_within_two_ulp():
    x = _exp_inputs()
    e = reference.exp_nonpositive(x)
    live = (x >= reference.EXP_LOW) & (x <= 0)
    truth = torch.exp(x[live].double())
    assert float(((e[live].double() - truth).abs() / truth).max()) <= 2 * 2.0**-24
    assert e[x == 0].eq(1.0).all() and e[x < reference.EXP_LOW].eq(0.0).all() and e[x > 0].eq(1.0).all()
    assert e[x.isnan()].isnan().all() and not e[~x.isnan()].isnan().any()
