"""The float32 route to int8 GEMMs gives torch._int_mm's integers exactly, and the model its bits."""
import pytest
import torch

import kernels
from kernels import cpu_fused, cpu_gemm, gemm_plan
from model.config import QuantConfig
from model.quant import QLinear


@pytest.mark.parametrize("k", [64, 576, 1024, 1025, 1536, 3000])
def test_float_route_equals_int_mm_at_the_extremes(k):
    """All-127 and all-(-128) operands make every partial sum as large as it can be: the chunking must hold it."""
    g = torch.Generator().manual_seed(k)
    rows = [torch.full((1, k), 127, dtype=torch.int8), torch.full((1, k), -128, dtype=torch.int8),
            torch.randint(-128, 128, (5, k), generator=g, dtype=torch.int8)]
    xq = torch.cat(rows)
    wq = torch.cat([torch.full((1, k), -128, dtype=torch.int8), torch.full((1, k), 127, dtype=torch.int8),
                    torch.randint(-128, 128, (6, k), generator=g, dtype=torch.int8)])
    want = torch._int_mm(xq, wq.t())
    got = cpu_gemm.int_mm_via_float(xq, cpu_gemm.float_weight(wq))
    assert torch.equal(got.double(), want.double())
    assert torch.equal(got.to(torch.float32), want.to(torch.float32))  # and so the epilogue's float32 too


def test_a_single_float32_gemm_past_exact_k_would_round():
    """The reason for the chunks: one float32 GEMM over 1536 products of 127*127 is past 2**24 and rounds."""
    k = 1536
    x = torch.full((1, k), 127, dtype=torch.int8)
    w = torch.cat([torch.full((1, k), 127, dtype=torch.int8), torch.full((1, k), 1, dtype=torch.int8)])
    w[0, 0] = 126  # an odd total that float32 cannot hold
    one_gemm = x.float() @ w.float().t()
    exact = torch._int_mm(x, w.t())
    assert int(exact[0, 0]) > 2**24 and float(one_gemm[0, 0]) != float(exact[0, 0])
    assert float(cpu_gemm.int_mm_via_float(x, cpu_gemm.float_weight(w))[0, 0]) == float(exact[0, 0])


@pytest.mark.parametrize("plan", [gemm_plan.GemmPlan(gemm_plan.ALWAYS, "test"),
                                  gemm_plan.GemmPlan(gemm_plan.ALWAYS, "test", panels_below=gemm_plan.ALWAYS),
                                  gemm_plan.GemmPlan(gemm_plan.ALWAYS, "test", c_through=cpu_gemm.C_MAX_ROWS),
                                  gemm_plan.GemmPlan(gemm_plan.NEVER, "test"),
                                  gemm_plan.GemmPlan(gemm_plan.NEVER, "test", onednn_from=1)],
                         ids=["float", "C panels", "C rows", "int, C epilogue", "int by oneDNN"])
@pytest.mark.parametrize("m", [1, 17])
def test_int8_matmul_gives_the_same_bits_by_every_route(monkeypatch, plan, m):
    if plan.route(m) == "C rows" and m > cpu_gemm.C_MAX_ROWS:
        m = cpu_gemm.C_MAX_ROWS
    if plan.onednn_from != gemm_plan.ALWAYS and not cpu_gemm.onednn_usable():
        pytest.skip("no oneDNN int8 matmul in this torch")
    monkeypatch.setattr(gemm_plan, "plan", lambda: plan)
    g = torch.Generator().manual_seed(m)
    xq = torch.randint(-127, 128, (m, 1536), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (40, 1536), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(m, 1, generator=g), torch.rand(40, generator=g)
    xs[0] = 1e-30  # products that land in float32's subnormals, and past its range (inf), must round alike
    xs[-1] = 1e30 if m > 1 else xs[-1]
    ws[:20] = torch.logspace(-20, 36, 20)
    via_int = kernels.int8_matmul(xq, xs, wq, ws)
    assert bool(((via_int != 0) & (via_int.abs() < 2**-126)).any()) and bool(via_int.isinf().any()) == (m > 1)
    forms = kernels.Int8WeightForms(wq)
    assert torch.equal(via_int, kernels.int8_matmul(xq.float(), xs, wq, ws, forms=forms))
    made = {"float": forms._float is not None, "packed": forms._packed is not None, "oneDNN": forms._onednn is not None}
    assert made == {"float": plan.route(m) == "float", "packed": plan.route(m) == "C panels",  # only what it ran
                    "oneDNN": plan.onednn_from != gemm_plan.ALWAYS}


@pytest.mark.parametrize("mode, rows, expected", [("int", 1, False), ("float", 4096, True)])
def test_the_plan_follows_the_environment(monkeypatch, mode, rows, expected):
    monkeypatch.setenv("PDSERVE_INT8_GEMM", mode)
    gemm_plan.plan.cache_clear()
    try:
        assert gemm_plan.plan().use_float(rows) is expected and gemm_plan.plan().source == "env"
        assert kernels.int8_gemm_in_float(torch.zeros(rows, 8, dtype=torch.int8)) is expected
    finally:
        gemm_plan.plan.cache_clear()


def test_a_bad_plan_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("PDSERVE_INT8_GEMM", "fast")
    gemm_plan.plan.cache_clear()
    try:
        with pytest.raises(ValueError, match="PDSERVE_INT8_GEMM"):
            gemm_plan.plan()
    finally:
        gemm_plan.plan.cache_clear()


def test_the_measured_plan_names_what_it_timed():
    plan = gemm_plan.measure()
    probed = set(gemm_plan.PROBE_ROWS) | set(gemm_plan.C_PROBE_ROWS) | set(gemm_plan.PANEL_PROBE_ROWS)
    kernels_timed = plan.timings_ms.pop(gemm_plan.PREFILL_PROBE_ROWS, None)  # the int route's two kernels, if timed
    assert plan.source == "measured" and set(plan.timings_ms) <= probed
    assert all({"int", "float"} <= set(ts) <= set(gemm_plan.ROUTES) and min(ts.values()) > 0
               for ts in plan.timings_ms.values())
    if kernels_timed is None:
        assert plan.onednn_from == gemm_plan.ALWAYS
    else:
        assert set(kernels_timed) == {"int", "oneDNN"} and plan.float_below != gemm_plan.ALWAYS
        faster = kernels_timed["oneDNN"] < kernels_timed["int"]
        assert plan.onednn_from == (gemm_plan.PREFILL_PROBE_ROWS if faster else gemm_plan.ALWAYS)
    untimed = [m for m, ts in plan.timings_ms.items() if ts["int"] == float("inf")]  # _int_mm hopeless at 1 row
    assert all(1 < m <= cpu_gemm.C_MAX_ROWS for m in untimed)
    assert not untimed or plan.timings_ms[1]["int"] > 4 * min(plan.timings_ms[1].values())
    assert plan.float_below in (gemm_plan.ALWAYS, *gemm_plan.PROBE_ROWS)
    assert plan.c_through in (0, *gemm_plan.C_PROBE_ROWS)
    assert plan.panels_below in (gemm_plan.NEVER, gemm_plan.ALWAYS, *gemm_plan.PANEL_PROBE_ROWS[1:])
    for m, ts in plan.timings_ms.items():  # each route runs only where it beat every route timed beside it
        route = plan.route(m)
        if route in ("C rows", "C panels") and route in ts:  # (rows past c_through may take panels, untimed there)
            assert ts[route] == min(ts.values())
        elif "C panels" in ts:
            assert ts["C panels"] >= min(ts["int"], ts["float"])
    assert "int8 GEMM on CPU" in plan.describe()


@pytest.mark.parametrize("k", [16, 40, 96, 576, 1536, 3000])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_the_c_rows_route_gives_int_mm_s_integers_at_the_extremes(k, m):
    """All-127 rows against all-(-128) and all-127 weights make every int32 lane as large as it can be;
    K = 40 takes the scalar loop, 96 the AVX2 loop, multiples of 64 the AVX-512 VNNI one where it is built."""
    g = torch.Generator().manual_seed(k * 100 + m)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    xq[0] = 127
    if m > 1:
        xq[1] = -127
    wq = torch.cat([torch.full((1, k), -128, dtype=torch.int8), torch.full((1, k), 127, dtype=torch.int8),
                    torch.randint(-128, 128, (37, k), generator=g, dtype=torch.int8)])
    got = cpu_gemm.int_mm_rows_c(xq.float(), wq)
    assert torch.equal(got, torch._int_mm(xq, wq.t()).to(torch.float32))
    assert torch.equal(got, cpu_gemm.int_mm_via_float(xq.float(), cpu_gemm.float_weight(wq)).to(torch.float32))


@pytest.mark.parametrize("k", [16, 33, 576, 1536, 3000])
@pytest.mark.parametrize("m", [1, 5, 6, 13, 50])
def test_the_c_panels_route_gives_int_mm_s_integers_at_the_extremes(k, m):
    """Extreme rows against extreme weight rows fill every int32 lane; odd K pads the pairs, 37 weight rows end
    in a partial panel, and rows not a multiple of the tile's 6 (or of the 48-row block) take the short tiles."""
    g = torch.Generator().manual_seed(k * 100 + m)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    xq[0] = 127
    xq[-1] = -127 if m > 1 else 127
    wq = torch.cat([torch.full((1, k), -128, dtype=torch.int8), torch.full((1, k), 127, dtype=torch.int8),
                    torch.randint(-128, 128, (35, k), generator=g, dtype=torch.int8)])
    got = cpu_gemm.int_mm_panels_c(xq.float(), cpu_gemm.pack_weight(wq), wq.shape[0])
    assert torch.equal(got, torch._int_mm(xq, wq.t()).to(torch.float32))


def test_the_c_panels_route_splits_across_threads_alike():
    g = torch.Generator().manual_seed(1)
    xq = torch.randint(-127, 128, (100, 576), generator=g).float()
    wq = torch.randint(-128, 128, (1000, 576), generator=g, dtype=torch.int8)
    packed, before = cpu_gemm.pack_weight(wq), torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):  # 100 x 1000 x 576 is past the size where a call starts threads
            torch.set_num_threads(threads)
            outs.append(cpu_gemm.int_mm_panels_c(xq, packed, 1000))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[0], torch._int_mm(xq.to(torch.int8), wq.t()).float())


def test_the_c_panels_route_refuses_what_it_cannot_hold():
    packed = cpu_gemm.pack_weight(torch.ones(4, 32, dtype=torch.int8))
    for x, why in ((torch.full((2, 32), 0.5), "integers"), (torch.full((2, 32), -128.0), "integers"),
                   (torch.full((2, 32), float("inf")), "integers"), (torch.ones(2, 34), "packed weight")):
        with pytest.raises(ValueError, match=why):
            cpu_gemm.int_mm_panels_c(x, packed, 4)


def test_the_c_rows_route_refuses_what_it_cannot_hold():
    wq = torch.ones(4, 32, dtype=torch.int8)
    for x, why in ((torch.full((1, 32), 0.5), "integers"), (torch.full((1, 32), 128.0), "integers"),
                   (torch.full((1, 32), float("nan")), "integers"), (torch.ones(17, 32), "17 rows")):
        with pytest.raises(ValueError, match=why):
            cpu_gemm.int_mm_rows_c(x, wq)


def test_a_layer_gives_the_same_bits_through_the_c_rows_route(monkeypatch):
    layer = QLinear(576, 1536, QuantConfig())
    layer.load_float(torch.randn(1536, 576))
    outs, rows_in_c, c_linear = {}, [], kernels.int8_linear_rows
    monkeypatch.setattr(kernels, "int8_linear_rows", lambda x, *a: rows_in_c.append(x.shape[0]) or c_linear(x, *a))
    for c_through in (0, 8):
        monkeypatch.setattr(gemm_plan, "plan", lambda: gemm_plan.GemmPlan(gemm_plan.ALWAYS, "test", c_through=c_through))
        outs[c_through] = [layer(torch.randn(m, 576, generator=torch.Generator().manual_seed(m))) for m in (1, 5, 8, 9)]
    assert rows_in_c == [1, 5, 8]  # the C path ran where the plan said, and only there
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[8]))
    plan = gemm_plan.GemmPlan(16, "test", c_through=8)
    assert plan.use_c_rows(8) and not plan.use_c_rows(9) and plan.use_float(9) and not plan.use_float(16)
    plan = gemm_plan.GemmPlan(256, "test", c_through=4, panels_below=128)
    assert [plan.route(m) for m in (4, 5, 127, 128, 255, 256)] == ["C rows", "C panels", "C panels", "float",
                                                                   "float", "int"]


def test_a_layer_gives_the_same_bits_through_the_c_panels_route(monkeypatch):
    layer = QLinear(1536, 576, QuantConfig())
    layer.load_float(torch.randn(576, 1536))
    x = torch.randn(70, 1536)
    outs = {}
    for name, plan in (("float", gemm_plan.GemmPlan(gemm_plan.ALWAYS, "test")),
                       ("panels", gemm_plan.GemmPlan(gemm_plan.ALWAYS, "test", panels_below=gemm_plan.ALWAYS))):
        monkeypatch.setattr(gemm_plan, "plan", lambda plan=plan: plan)
        outs[name] = layer(x)
    assert torch.equal(outs["float"], outs["panels"])
    layer.load_state_dict({**layer.state_dict(), "weight_q": -layer.weight_q})  # in place: the packed copy follows
    assert torch.equal(layer(x), -outs["panels"])


def test_a_layer_gives_the_same_bits_by_either_route_and_follows_its_weights(monkeypatch):
    layer = QLinear(1536, 64, QuantConfig())
    layer.load_float(torch.randn(64, 1536))
    x = torch.randn(9, 1536)
    outs = {}
    for mode in ("int", "float", "c"):
        monkeypatch.setenv("PDSERVE_INT8_GEMM", mode)
        gemm_plan.plan.cache_clear()
        outs[mode] = layer(x)
    assert torch.equal(outs["int"], outs["float"]) and torch.equal(outs["int"], outs["c"])
    layer.load_state_dict({**layer.state_dict(), "weight_q": -layer.weight_q})  # in place: the float copy follows
    assert torch.equal(layer(x), -outs["float"])
    gemm_plan.plan.cache_clear()


def test_the_float_quantizer_holds_the_int8_quantizers_integers():
    x = torch.randn(7, 300) * torch.logspace(-3, 3, 7)[:, None]
    q, s = kernels.quantize_rows(x)
    qf, sf = kernels.quantize_rows_float(x)
    assert qf.dtype == torch.float32 and torch.equal(qf.to(torch.int8), q) and torch.equal(sf, s)


def test_a_layer_notices_smoothing_loaded_after_its_first_call():
    """The layer skips multiplying by an all-ones inv_smooth; a state dict that brings one must count."""
    layer = QLinear(64, 16, QuantConfig())
    layer.load_float(torch.randn(16, 64))
    x = torch.randn(3, 64)
    plain = layer(x)
    smooth = torch.linspace(0.5, 2.0, 64)
    layer.load_state_dict({**layer.state_dict(), "inv_smooth": 1.0 / smooth})
    reference = QLinear(64, 16, QuantConfig())
    reference.load_state_dict(layer.state_dict())
    reference._smoothed = lambda: True  # the path that always multiplies
    assert not torch.equal(layer(x), plain) and torch.equal(layer(x), reference(x))


def test_the_probe_times_both_paths_on_one_thread_and_restores_the_count(monkeypatch):
    """Several OpenMP threads on cores another process keeps busy make the fp32 GEMM wait for its
    descheduled threads, so a multi-threaded probe on a loaded machine picked _int_mm for good."""
    seen = []
    monkeypatch.setattr(gemm_plan, "_probe", lambda: seen.append(torch.get_num_threads()) or gemm_plan.GemmPlan(1, "t"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert gemm_plan.measure().float_below == 1
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_few_row_probe_passes_over_more_weights_than_a_cache_holds(monkeypatch):
    """A decode step reads each weight once, from memory, so the probe's few-row timings must too: on one small
    weight (in L2) the float route's 4-byte copies looked as fast as the int8 routes, and decode ran ~1.6x slower."""
    seen: dict[int, set[int]] = {}
    real = cpu_gemm.int_mm_via_float

    def spy(xq, wq_float):
        seen.setdefault(xq.shape[0], set()).add(wq_float.data_ptr())
        return real(xq, wq_float)

    monkeypatch.setattr(cpu_gemm, "int_mm_via_float", spy)
    gemm_plan._probe()
    rows, cols = gemm_plan.STREAM_SHAPE
    assert seen and min(seen) == 1
    for m, weights in seen.items():
        assert len(weights) * rows * cols >= gemm_plan.STREAM_BYTES if m <= cpu_gemm.C_MAX_ROWS else len(weights) == 1


def test_a_torch_int_mm_that_is_not_exact_is_never_planned(monkeypatch):
    """oneDNN's int8 kernels without VNNI saturate int16 pair sums (seen under ONEDNN_MAX_CPU_ISA=AVX2 on a VNNI
    machine: sums off by ~10**5); the probe must notice and keep every row count off that route."""
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: real(a, b).clamp(-2**14, 2**14))  # a saturating stand-in
    assert not gemm_plan.int_mm_is_exact(torch.Generator().manual_seed(0))
    plan = gemm_plan._probe()
    assert all(plan.route(m) != "int" for m in (1, 4, 8, 16, 128, 4096)) and "not exact" in plan.describe()
    monkeypatch.setattr(torch, "_int_mm", real)
    assert gemm_plan.int_mm_is_exact(torch.Generator().manual_seed(0))
    if cpu_gemm.onednn_usable():  # the same for oneDNN's matmul
        good = cpu_gemm.onednn_int_mm
        monkeypatch.setattr(cpu_gemm, "onednn_int_mm", lambda x, f: good(x, f).clamp(-2**14, 2**14))
        assert not gemm_plan.int_mm_is_exact(torch.Generator().manual_seed(0), "oneDNN")
        assert gemm_plan._probe().onednn_from == gemm_plan.ALWAYS


def test_the_rows_route_splits_decode_s_weights_across_threads_alike(monkeypatch):
    """The C rows GEMM is bound by reading the weight, so with OpenMP every weight of 64 KiB or more splits across
    the threads at any row count (one row included); the split is by output column, so the bits stay."""
    if not cpu_fused.available():
        pytest.skip("no C library here")
    x = torch.randint(-127, 128, (1, 576), generator=torch.Generator().manual_seed(1)).float()
    wq = torch.randint(-127, 128, (960, 576), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    if cpu_fused.openmp():
        assert cpu_gemm._rows_threads(1, 960, 576) == torch.get_num_threads()
        assert cpu_gemm._rows_threads(1, 64, 64) == 1
    outs = []
    before = torch.get_num_threads()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(cpu_gemm.int_mm_rows_c(x, wq))
    torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.equal(outs[0], x @ wq.t().float())


@pytest.mark.parametrize("m, k, block", [(1, 576, 64), (4, 1536, 512), (8, 192, 64), (3, 48, 16)])
def test_the_one_call_linear_gives_the_prologue_and_rows_gemm_s_bits(m, k, block):
    """The C rows route with its prologue in the same call: the two calls' bits apart, on any thread count."""
    if not cpu_fused.available():
        pytest.skip("no C library here")
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, k)  # wide channels: scales and rounding matter
    x[0, :3] = torch.tensor([0.0, 1e-30, -3e4])
    wq = torch.randint(-127, 128, (200, k), dtype=torch.int8, generator=gen)
    ws = torch.rand(200, generator=gen) + 1e-3
    q, xs = kernels.rotate_quantize_rows_float(x, block)
    apart = cpu_gemm.int_mm_rows_c(q, wq, xs, ws)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(kernels.int8_linear_rows(x, block, wq, ws), apart)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="C int8 linear"):
        kernels.int8_linear_rows(x[:, :k - 1], block, wq[:, :k - 1], ws)
    with pytest.raises(ValueError, match="C int8 linear"):
        kernels.int8_linear_rows(torch.randn(cpu_gemm.C_MAX_ROWS + 1, k), block, wq, ws)


def test_a_layer_gives_the_same_bits_on_either_side_of_the_onednn_threshold(monkeypatch):
    """A prefill of many rows goes to oneDNN's matmul, the same rows in small chunks to _int_mm: a row's bits must
    not depend on which (batch invariance across the threshold)."""
    if not cpu_gemm.onednn_usable():
        pytest.skip("no oneDNN int8 matmul in this torch")
    layer = QLinear(576, 960, QuantConfig())
    layer.load_float(torch.randn(960, 576))
    x = torch.randn(600, 576, generator=torch.Generator().manual_seed(5))
    plan = gemm_plan.GemmPlan(gemm_plan.NEVER, "test", onednn_from=512)
    monkeypatch.setattr(gemm_plan, "plan", lambda: plan)
    calls = []
    real = cpu_gemm.onednn_int_mm
    monkeypatch.setattr(cpu_gemm, "onednn_int_mm", lambda xq, f: calls.append(xq.shape[0]) or real(xq, f))
    whole = layer(x)
    chunks = torch.cat([layer(x[i:i + 100]) for i in range(0, 600, 100)])
    assert calls == [600] and torch.equal(whole, chunks)
