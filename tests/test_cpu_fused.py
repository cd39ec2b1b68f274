"""The fused C prologue of the int8 linear (kernels/cpu_fused.c) gives the torch ops' bits exactly."""
import shutil
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import cpu_fused, cpu_gemm
from model.config import QuantConfig
from model.quant import QLinear, hadamard_rotate

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
                              reason="no C compiler: the fused prologue falls back to the torch ops")


def torch_prologue(x: torch.Tensor, block: int):
    return kernels.quantize_rows_float(hadamard_rotate(x, block))


def awkward_rows(m: int, k: int, seed: int) -> torch.Tensor:
    """Rows of mixed scales with an outlier, an all-zero row, exact ties for rounding and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 3, m)[:, None]
    x[0, 3] = 5e3
    if m > 2:
        x[1] = 0.0
        x[2, ::2] = -0.0
    if m > 3:
        x[3] = torch.randint(-4, 5, (k,), generator=g).float() * 0.5  # sums land on .5 grid points
    return x


@needs_cc
@pytest.mark.parametrize("m", [1, 2, 5, 33, 130])
@pytest.mark.parametrize("k, block", [(576, 64), (1536, 512), (960, 64), (48, 16), (8, 1)])
def test_fused_prologue_matches_the_torch_ops_bit_for_bit(m, k, block):
    assert cpu_fused.available()
    x = awkward_rows(m, k, seed=m * 1000 + k)
    q, s = cpu_fused.rotate_quantize_rows_float(x, block)
    q_ref, s_ref = torch_prologue(x, block)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)
    assert q.abs().max() <= 127
    q8, s8 = cpu_fused.rotate_quantize_rows_float(x, block, as_int8=True)  # the int8 codes torch._int_mm takes
    assert q8.dtype == torch.int8 and torch.equal(q8, q_ref.to(torch.int8)) and torch.equal(s8, s_ref)


@needs_cc
def test_non_finite_rows_propagate_as_in_torch():
    x = torch.randn(3, 64)
    x[0, 5], x[1, 7] = float("nan"), float("inf")
    q, s = cpu_fused.rotate_quantize_rows_float(x, 64)
    q_ref, s_ref = torch_prologue(x, 64)
    assert torch.equal(q.isnan(), q_ref.isnan()) and torch.equal(s.isnan(), s_ref.isnan())
    assert torch.equal(q[2], q_ref[2]) and torch.equal(s[2], s_ref[2])


@needs_cc
def test_an_int8_linear_gives_the_same_bits_with_and_without_the_fused_prologue(monkeypatch):
    layer = QLinear(576, 960, QuantConfig())
    layer.load_float(torch.randn(960, 576) * 0.05)
    x = awkward_rows(7, 576, seed=3)
    monkeypatch.setattr(kernels, "fused_linear", lambda t: False)  # not the rows route's one call (its own test)
    assert kernels.fused_prologue(x)
    fused = layer(x)
    calls = []
    monkeypatch.setattr(kernels, "fused_prologue", lambda t: calls.append(t) and False)
    unfused = layer(x)
    assert calls and torch.equal(fused, unfused)  # the layer asked, and took the torch ops


def test_bad_rows_are_refused_with_a_message():
    with pytest.raises(ValueError, match="float32 CPU rows"):
        cpu_fused.rotate_quantize_rows_float(torch.zeros(2, 60), 64)
    with pytest.raises(ValueError, match="float32 CPU rows"):
        cpu_fused.rotate_quantize_rows_float(torch.zeros(2, 64, dtype=torch.float64), 64)


def test_without_a_compiler_the_torch_ops_run(tmp_path):
    """No compiler on PATH (and a fresh cache): a warning, no fused prologue, and the layer still works."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from kernels import cpu_fused\n"
            "try:\n    cpu_fused.library()\nexcept UserWarning as w:\n    print('warned:', w)\n"
            "warnings.simplefilter('ignore')\n"
            "import torch; from model.config import QuantConfig; from model.quant import QLinear\n"
            "l = QLinear(64, 32, QuantConfig()); l.load_float(torch.randn(32, 64))\n"
            "print('available', cpu_fused.available(), tuple(l(torch.randn(3, 64)).shape))\n")
    env = {"PATH": str(tmp_path), "PDSERVE_CACHE": str(tmp_path / "cache"), "CC": "cc", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warned: fused CPU prologue unavailable" in out.stdout and "no C compiler" in out.stdout
    assert "available False (3, 32)" in out.stdout


def test_a_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("PDSERVE_CPU_FUSED", "sometimes")
    cpu_fused.library.cache_clear()
    try:
        with pytest.raises(ValueError, match="PDSERVE_CPU_FUSED must be auto, on or off"):
            cpu_fused.library()
    finally:
        monkeypatch.delenv("PDSERVE_CPU_FUSED")
        cpu_fused.library.cache_clear()


@needs_cc
@pytest.mark.parametrize("n", [1, 7, 130, 400])  # 400: split over the threads
def test_the_c_kv_write_stores_the_references_bytes(n):
    """Quantized K/V rows and their scales land in the pool exactly as ``reference.write_kv`` puts them: rows
    of mixed scales, a zero row, .5 ties, a repeated slot (the later row wins in both)."""
    from kernels import reference

    hkv, d, bs, blocks = 3, 64, 16, 32
    g = torch.Generator().manual_seed(n)
    k, v = (awkward_rows(n * hkv, d, seed).reshape(n, hkv, d) for seed in (n, n + 1))
    if n > 1:
        k[-1, 0] = torch.arange(d).float() * 0.5 - 8.0  # .5 ties: max |x| is 127 below, so the scale is 1
        k[-1, 0, 0] = 127.0
    slots = torch.randperm(blocks * bs, generator=g)[:n]
    if n > 2:
        slots[-1] = slots[0]
    pools = {}
    for how in ("reference", "c"):
        pool = [torch.zeros(blocks, bs, hkv, d, dtype=torch.int8) for _ in range(2)] + \
               [torch.zeros(blocks, bs, hkv, 1) for _ in range(2)]
        assert cpu_fused.write_kv_usable(pool[0], pool[2], k)
        if how == "reference":  # torch leaves duplicate indices' order undefined: give it the later row only
            keep = slice(1, None) if n > 2 else slice(None)
            reference.write_kv(*pool, k[keep], v[keep], slots[keep])
        else:
            cpu_fused.write_kv_int8(*pool, k, v[:, :, :], slots)
        pools[how] = pool
    assert all(torch.equal(a, b) for a, b in zip(pools["reference"], pools["c"]))
    assert pools["c"][0].abs().sum() > 0 and pools["c"][2].min() >= 0
    with pytest.raises(IndexError, match="KV slots"):
        cpu_fused.write_kv_int8(*pools["c"], k, v, slots * 0 + blocks * bs)


@needs_cc
def test_an_engine_gives_the_same_tokens_with_the_c_kv_write(monkeypatch):
    from model.engine import Engine, EngineConfig, SamplingParams
    from model.loader import load

    model = load("skv-tiny").model
    prompts = [list(range(3, 40)), list(range(7, 19))]
    out, calls = {}, []
    c_write = cpu_fused.write_kv_int8
    monkeypatch.setattr(cpu_fused, "write_kv_int8", lambda *a: calls.append(1) or c_write(*a))
    for usable in (True, False):
        if not usable:
            monkeypatch.setattr(cpu_fused, "write_kv_usable", lambda *a: False)
        engine = Engine(model, EngineConfig(num_blocks=16, max_batched_tokens=32))
        out[usable] = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
        if usable:
            assert calls  # the C write ran
    assert out[True] == out[False] and len(calls) > 0


@pytest.mark.skipif(not cpu_fused.available(), reason="no C compiler")
def test_the_c_kernels_threads_are_torch_s_openmp_threads():
    """Built with OpenMP, the library must use the runtime torch already loaded (same soname), not a second one
    whose threads would compete with torch's spinning workers: torch.set_num_threads must reach it."""
    assert cpu_fused.openmp()
    lib, before = cpu_fused.library(), torch.get_num_threads()
    try:
        for threads in (3, 1, 2):
            torch.set_num_threads(threads)
            assert lib.pdserve_openmp() == threads
        x = torch.randint(-127, 128, (64, 576)).float()
        w = torch.randint(-128, 128, (512, 576), dtype=torch.int8)
        two = cpu_gemm.int_mm_panels_c(x, cpu_gemm.pack_weight(w), 512)
        torch.set_num_threads(1)  # a 2-thread call gives the 1-thread bits
        assert torch.equal(two, cpu_gemm.int_mm_panels_c(x, cpu_gemm.pack_weight(w), 512))
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not cpu_fused.available(), reason="no C compiler")
def test_a_compiler_without_openmp_still_builds_the_library(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_fused, "OPENMP", ["-fno-such-openmp-flag"])  # the compiler refuses it
    lib = cpu_fused.load(cpu_fused._build(cpu_fused.compiler()))
    assert lib.pdserve_openmp() == 0  # the pthreads fallback
    x = torch.randint(-127, 128, (9, 64)).float()
    w = torch.randint(-128, 128, (40, 64), dtype=torch.int8)
    out = torch.empty(9, 40)
    packed = cpu_gemm.pack_weight(w)
    assert lib.pdserve_int8_gemm_packed(x.data_ptr(), 9, 64, packed.data_ptr(), 40, 64, 0, 0, out.data_ptr(), 2) == 0
    assert torch.equal(out, torch._int_mm(x.to(torch.int8), w.t()).float())


@pytest.mark.skipif(not cpu_fused.available(), reason="no C compiler")
def test_a_compiler_without_amx_still_builds_the_library(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_fused, "AMX_FLAGS", ["-fno-such-amx-flag"])  # the compiler refuses it
    monkeypatch.setattr(cpu_fused, "_machine_flags", lambda: ["-fno-such-amx-flag"])
    lib = cpu_fused.load(cpu_fused._build(cpu_fused.compiler()))
    assert lib.pdserve_amx_ready() == 0  # built without the AMX attention: the AVX tiles run
    assert (lib.pdserve_openmp() > 0) == cpu_fused.openmp()  # the OpenMP build, where the real one has it


@needs_cc
@pytest.mark.skipif("-mavx512vnni" not in cpu_fused._machine_flags(), reason="no AVX-512 VNNI: one build only")
def test_the_avx512_and_avx2_builds_give_the_same_bits(tmp_path, monkeypatch):
    """Where the CPU has AVX-512 VNNI the library's tiles (8 x 16, vpdpwssd) and few-row GEMMs (vpdpbusd) run on
    it (and with AMX, the tiled prefill attention on AMX tiles), elsewhere on AVX2: the tiled prefill attention and
    both GEMM routes give the same bits from both builds."""
    from kernels import cpu_attention, reference

    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(4 * 64, 3, 64, generator=g), torch.randn(4 * 64, 3, 64, generator=g)
    (kq, ks), (vq, vs) = reference.quantize_rows(k), reference.quantize_rows(v)
    pools = (kq.view(4, 64, 3, 64), vq.view(4, 64, 3, 64), ks.view(4, 64, 3, 1), vs.view(4, 64, 3, 1))
    q = torch.randn(203, 9, 64, generator=g) * 3
    x = torch.randint(-127, 128, (45, 576), generator=g).float()
    w = torch.randint(-128, 128, (100, 576), generator=g, dtype=torch.int8)
    outs = []
    for name, machine in (("avx2", ["-mavx2"]), ("avx512", cpu_fused._machine_flags())):
        path = tmp_path / f"{name}.so"
        cpu_fused.compile_library(cpu_fused.compiler(), cpu_fused.SOURCES, path, cpu_fused.FLAGS + cpu_fused.OPENMP + machine)
        monkeypatch.setattr(cpu_fused, "library", lambda lib=cpu_fused.load(path): lib)
        outs.append((cpu_attention.paged_prefill_attention(q, *pools, torch.arange(4), 40),
                     cpu_gemm.int_mm_panels_c(x, cpu_gemm.pack_weight(w), 100), cpu_gemm.int_mm_rows_c(x[:5], w)))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert torch.equal(outs[1][1], torch._int_mm(x.to(torch.int8), w.t()).float())
    assert torch.equal(outs[1][2], outs[1][1][:5])


@needs_cc
@pytest.mark.parametrize("n, heads, extra, d", [(1, 12, 3, 64), (5, 9, 0, 64), (3, 2, 5, 16), (2, 1, 1, 128),
                                                (300, 12, 3, 64)])  # the last split over the threads
def test_the_c_rope_gives_the_torch_ops_bits_in_place(n, heads, extra, d):
    from model.transformer import Rotary

    rows = awkward_rows(n, (heads + extra) * d, seed=n * d + heads)
    positions = torch.randint(0, 4000, (n,), generator=torch.Generator().manual_seed(heads))
    at = Rotary(d, 100000.0, 4096).at(positions)
    expected = rows.clone()
    expected[:, :heads * d] = at(rows[:, :heads * d].reshape(n, heads, d)).reshape(n, -1)
    assert kernels.small_ops_in_c(rows, at.cos, at.signed_sin)
    at.rotate_heads_(rows, heads)
    assert torch.equal(rows, expected)  # the heads rotated as torch rotates them, the rest untouched


@needs_cc
@pytest.mark.parametrize("m, k", [(1, 576), (7, 576), (4, 48), (200, 576)])  # the last split over the threads
def test_the_c_rms_norm_tail_gives_the_torch_ops_bits(m, k):
    from model.transformer import RMSNorm

    norm = RMSNorm(k, 1e-5, torch.float32)
    norm.weight.copy_(torch.randn(k, generator=torch.Generator().manual_seed(k)) * 3)
    x = awkward_rows(m, k, seed=m + k)
    ms = x.pow(2).mean(-1, keepdim=True)
    assert kernels.small_ops_in_c(x, ms, norm.weight)
    expected = norm.weight * (x * torch.rsqrt(ms + norm.eps))
    assert torch.equal(norm(x), expected)
    assert torch.equal(kernels.rms_scale(x, ms, norm.weight, norm.eps), expected)


@needs_cc
def test_a_model_gives_the_same_logits_with_and_without_the_c_rope_and_norm(monkeypatch):
    from model.kv_cache import ContiguousKVCache
    from model.loader import load

    model = load("skv-tiny").model
    tokens = torch.arange(3, 45)
    logits = []
    for in_c in (True, False):
        if not in_c:
            monkeypatch.setattr(kernels, "small_ops_in_c", lambda *t: False)
        cache = ContiguousKVCache(model.config, max_len=64)
        with torch.inference_mode():
            whole = model(tokens[:40], cache.extend(40))
            steps = [model(tokens[i:i + 1], cache.extend(1)) for i in range(40, 42)]
        logits.append(torch.cat([whole, *steps]))
    assert torch.equal(logits[0], logits[1])
