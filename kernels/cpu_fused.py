"""The int8 linear's prologue (rotate + quantize per row) as one C call on CPU, where a compiler is.

The same library holds the exact paged attention (``cpu_attention.c``, ``kernels.cpu_attention``), the int8
GEMMs of a few rows and of many (``cpu_int8_gemm.c``, ``kernels.cpu_gemm``), the KV write, and the model's RoPE
and RMSNorm tail (``rope_heads_``, ``rms_scale``: the torch ops' bits, one call instead of several).

At batch 1 the prologue is ~40 small torch ops (the Hadamard butterflies, then abs / amax / div /
round / clamp), each a few microseconds of dispatch: several times the GEMV it feeds. The C
loop in ``cpu_fused.c`` does the same arithmetic in the same order, one rounding per operation,
so its bits are torch's (tests/test_cpu_fused.py compares them) and batch invariance holds.

It is compiled once per machine with the system's C compiler (``cc``; no torch headers, so about
a second) into ``~/.cache/pdserve/kernels`` (``$PDSERVE_CACHE/kernels`` if set) and loaded with ctypes. Without a compiler, or with
``PDSERVE_CPU_FUSED=off``, the torch ops run: same bits, slower. ``PDSERVE_CPU_FUSED=on`` makes a
failed build an error instead of a fallback.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_fused.c", "cpu_attention.c", "cpu_attention_prefill.c",
                                                               "cpu_attention_amx.c", "cpu_int8_gemm.c")]
# Included by the sources: part of the build's name, not compiled alone.
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_tile.h", "cpu_attention.h", "cpu_attention_sums.h",
                                                               "cpu_threads.h")]
FLAGS = ["-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-fast-math", "-std=c99"]
OPENMP = ["-fopenmp"]


AVX512_VNNI = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")  # cpuinfo's names: what the 512-bit kernels use
AMX_INT8 = ("amx_tile", "amx_int8")
AMX_FLAGS = ["-mamx-tile", "-mamx-int8"]


def _machine_flags() -> list[str]:
    """-mavx2 where the CPU has it (x86-64 Linux): 8-wide loops and a vector round; with AVX-512 VNNI too,
    its flags (cpu_tile.h's tiles on vpdpwssd, the few-row GEMM on vpdpbusd; ``PDSERVE_CPU_AVX512=off`` keeps
    AVX2), and with AMX, its (``cpu_attention_amx.c``: a prefill's attention on AMX tiles). Part of the build's
    name, so machines of other kinds sharing a home directory each build their own."""
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), [])
    if platform.machine() not in ("x86_64", "AMD64") or "avx2" not in flags:
        return []
    if os.environ.get("PDSERVE_CPU_AVX512", "auto") != "off" and all(f in flags for f in AVX512_VNNI):
        amx = AMX_FLAGS if all(f in flags for f in AMX_INT8) else []
        return ["-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", *amx]
    return ["-mavx2"]


def _flag_sets() -> list[list[str]]:
    """The builds to try, best first: with OpenMP, then without; a compiler that rejects the AMX flags (GCC
    before 11) builds without them."""
    machine = _machine_flags()
    sets = [FLAGS + OPENMP + machine, FLAGS + machine]
    if AMX_FLAGS[0] in machine:
        plain = [f for f in machine if f not in AMX_FLAGS]
        sets += [FLAGS + OPENMP + plain, FLAGS + plain]
    return sets


def _cache_dir() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve")) / "kernels"


def _build(cc: str) -> Path:
    """Compile to a file named by the source, flags, compiler and machine (a shared home directory
    can hold several); written under a temporary name and renamed, so concurrent workers never load
    half a file. With OpenMP where the compiler has it (``cpu_threads.h``: the kernels' threads are then
    torch's), else with threads of their own."""
    text = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    sets = _flag_sets()
    for flags in sets:
        key = hashlib.sha256(text + " ".join([cc, *flags, platform.machine()]).encode()).hexdigest()[:16]
        out = _cache_dir() / f"cpu_fused-{key}.so"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            part = Path(tmp) / out.name
            try:
                compile_library(cc, SOURCES, part, flags)
            except subprocess.CalledProcessError:
                if flags is not sets[-1]:
                    continue  # no OpenMP (or no AMX) here: build without it
                raise
            os.replace(part, out)
        return out
    raise AssertionError("unreachable")


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def compile_library(cc: str, sources: list[Path], out: Path, flags: list[str] | None = None) -> None:
    """Build ``sources`` into the shared library ``out`` with this module's flags (also for
    ``benchmarks.c_kernels_vs``, which builds a git revision's sources alike)."""
    flags = FLAGS + OPENMP + _machine_flags() if flags is None else flags
    subprocess.run([cc, *flags, *map(str, sources), "-o", str(out), "-lm"], check=True, capture_output=True,
                   text=True, timeout=120)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled prologue, or None (no compiler, build failed, or turned off)."""
    mode = os.environ.get("PDSERVE_CPU_FUSED", "auto")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"PDSERVE_CPU_FUSED must be auto, on or off; got {mode!r}")
    if mode == "off":
        return None
    cc = compiler()
    try:
        if cc is None:
            raise FileNotFoundError("no C compiler (cc, gcc or clang) on PATH")
        return load(_build(cc))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        if mode == "on":
            raise RuntimeError(f"PDSERVE_CPU_FUSED=on but the fused CPU prologue did not build: {detail}") from e
        warnings.warn(f"fused CPU prologue unavailable, using torch ops (same results, slower): {detail}")
        return None


def load(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with its functions' argument types declared."""
    lib = ctypes.CDLL(str(path))
    fn = lib.pdserve_rotate_quantize
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_float]
    fn.restype = ctypes.c_int
    if hasattr(lib, "pdserve_rotate_quantize_int8"):
        lib.pdserve_rotate_quantize_int8.argtypes = fn.argtypes
        lib.pdserve_rotate_quantize_int8.restype = ctypes.c_int
    # kernels.cpu_attention (a revision's library may hold pdserve_attn_scores, the weights before their exp)
    for name in ("pdserve_attn_weights", "pdserve_attn_scores", "pdserve_attn_pv"):
        if not hasattr(lib, name):
            continue
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       *[ctypes.c_float] * (1 if name == "pdserve_attn_pv" else 2), ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = ctypes.c_int
    if hasattr(lib, "pdserve_int8_linear_rows"):  # cpu_gemm's rows route with the prologue in the same call
        lib.pdserve_int8_linear_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                 ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_int64]
        lib.pdserve_int8_linear_rows.restype = ctypes.c_int
    if hasattr(lib, "pdserve_rope_heads"):  # model/transformer.py's RoPE and RMSNorm, their torch ops' bits
        lib.pdserve_rope_heads.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2
        lib.pdserve_rope_heads.restype = ctypes.c_int
        lib.pdserve_rms_scale.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_float, ctypes.c_void_p] + \
            [ctypes.c_int64] * 2
        lib.pdserve_rms_scale.restype = None
    if hasattr(lib, "pdserve_int32_scaled"):  # cpu_gemm's epilogue of torch._int_mm
        lib.pdserve_int32_scaled.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [
            ctypes.c_int64]
        lib.pdserve_int32_scaled.restype = ctypes.c_int
    if hasattr(lib, "pdserve_float_scaled"):  # the same epilogue after oneDNN's int8 matmul
        lib.pdserve_float_scaled.argtypes = lib.pdserve_int32_scaled.argtypes
        lib.pdserve_float_scaled.restype = ctypes.c_int
    if hasattr(lib, "pdserve_attn_prefill"):  # kernels.cpu_attention's prefill on AMX tiles, both halves in one call
        lib.pdserve_attn_prefill.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_int64, ctypes.c_void_p, *[ctypes.c_int64] * 3,
                                             *[ctypes.c_void_p] * 4, ctypes.c_int64, *[ctypes.c_float] * 3,
                                             ctypes.c_void_p, ctypes.c_int64]
        lib.pdserve_attn_prefill.restype = ctypes.c_int
    if hasattr(lib, "pdserve_exp_nonpositive"):
        lib.pdserve_exp_nonpositive.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.pdserve_exp_nonpositive.restype = None
    lib.pdserve_attn_layout.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
    lib.pdserve_attn_layout.restype = ctypes.c_int64
    lib.pdserve_int8_gemm_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,  # cpu_gemm
                                           ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.pdserve_int8_gemm_rows.restype = ctypes.c_int
    if hasattr(lib, "pdserve_int8_gemm_packed"):  # cpu_gemm's panels route (a revision's library may predate it)
        lib.pdserve_int8_gemm_packed.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                                 ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
        lib.pdserve_int8_gemm_packed.restype = ctypes.c_int
    if hasattr(lib, "pdserve_int8_gemm_rows_scaled"):
        lib.pdserve_int8_gemm_rows_scaled.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                                      ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64]
        lib.pdserve_int8_gemm_rows_scaled.restype = ctypes.c_int
    if hasattr(lib, "pdserve_write_kv"):  # a revision's library built by benchmarks.c_kernels_vs may predate it
        lib.pdserve_write_kv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4 + \
            [ctypes.c_int64]
        lib.pdserve_write_kv.restype = ctypes.c_int
    return lib


def amx() -> bool:
    """Whether a prefill's attention runs on AMX tiles here (``cpu_attention_amx.c``): built for them, the kernel
    granted them, ``PDSERVE_CPU_AMX`` not ``off``."""
    lib = library()
    return (lib is not None and hasattr(lib, "pdserve_amx_ready") and os.environ.get("PDSERVE_CPU_AMX") != "off"
            and bool(lib.pdserve_amx_ready()))


def openmp() -> bool:
    """Whether the library was built with OpenMP (its threads then torch's; ``cpu_threads.h``)."""
    lib = library()
    return lib is not None and hasattr(lib, "pdserve_openmp") and bool(lib.pdserve_openmp())


def profiled(name: str):
    """A named scope for torch.profiler around a C call (which it cannot see), only while it runs."""
    running = getattr(torch.autograd.profiler, "_is_profiler_enabled", False)  # private: absent means no scopes
    return torch.profiler.record_function(name) if running else contextlib.nullcontext()


def available() -> bool:
    return library() is not None


def rotate_quantize_rows_float(x: torch.Tensor, block: int,
                               as_int8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows_float(hadamard_rotate(x, block))`` for float32 CPU rows [M, K]: integers held in
    float32 [M, K] (``as_int8``: as int8, where the library has that entry, else converted by torch) and scales
    [M, 1]. Call only where ``available()``."""
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_cpu or x.shape[1] % block:
        raise ValueError(f"fused prologue takes float32 CPU rows [M, K] with K a multiple of {block}; "
                         f"got {x.dtype} {tuple(x.shape)} on {x.device}")
    x = x.contiguous()
    m, k = x.shape
    entry = getattr(library(), "pdserve_rotate_quantize_int8", None) if as_int8 else None
    q = torch.empty((m, k), dtype=torch.int8 if entry else torch.float32)
    scale = torch.empty((m, 1), dtype=torch.float32)
    # block**-0.5 goes as a C float (rounded to nearest), as torch rounds a Python scalar for a float32 multiply
    with profiled("pdserve::prologue_c"):
        status = m and (entry or library().pdserve_rotate_quantize)(x.data_ptr(), q.data_ptr(), scale.data_ptr(), m,
                                                                     k, block, block ** -0.5)
    if status:
        raise MemoryError("fused prologue: out of memory for one row's buffer")
    return (q.to(torch.int8) if as_int8 and not entry else q), scale


def small_ops_usable(*tensors: torch.Tensor) -> bool:
    """Whether ``rope_heads_`` and ``rms_scale`` take these: float32 CPU tensors, contiguous, the library built."""
    return (all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors) and available()
            and hasattr(library(), "pdserve_rope_heads"))


def rope_heads_(rows: torch.Tensor, heads: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """RoPE in place on the first ``heads`` heads of each row [N, W] (``model.transformer.RopeAt``'s bits; cos and
    signed_sin [N, D]): at batch 1 the torch ops are ~8 calls per head group, more time than their arithmetic."""
    n, d = rows.shape[0], cos.shape[-1]
    with profiled("pdserve::rope_c"):
        status = n and library().pdserve_rope_heads(rows.data_ptr(), n, rows.stride(0), heads, d, cos.data_ptr(),
                                                    signed_sin.data_ptr())
    if status:
        raise ValueError(f"C RoPE: a head of {d} values (even, at most 512)")


def rms_scale(x: torch.Tensor, mean_square: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * torch.rsqrt(mean_square + eps))`` for rows [M, K] in one C call, torch's bits."""
    out = torch.empty_like(x)
    with profiled("pdserve::rms_scale_c"):
        library().pdserve_rms_scale(x.data_ptr(), mean_square.data_ptr(), weight.data_ptr(), eps, out.data_ptr(),
                                    x.shape[0], x.shape[1])
    return out


def write_kv_usable(k_pool: torch.Tensor, k_scale: torch.Tensor | None, k: torch.Tensor) -> bool:
    """Whether ``write_kv_int8`` takes these: float32 K/V into an int8 pool on the CPU, the library built."""
    return (k_scale is not None and k.dtype == torch.float32 and k.is_cpu and k_pool.dtype == torch.int8
            and k_pool.is_contiguous() and k_scale.is_contiguous() and available())


def write_kv_int8(k_pool: torch.Tensor, v_pool: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """``kernels.reference.write_kv`` into an int8 pool in one C call (the reference's quantize and four scatters
    are ~16 torch ops a layer: at batch 1 more time than the arithmetic). Same bytes (tests/test_cpu_fused.py)."""
    n, hkv, d = k.shape
    capacity = k_pool.numel() // (hkv * d)
    k, v, slots = k.contiguous(), v.contiguous(), slots.to(torch.int64).contiguous()
    with profiled("pdserve::write_kv_c"):  # C checks the slots' range first (no torch reductions a layer)
        status = library().pdserve_write_kv(k.data_ptr(), v.data_ptr(), slots.data_ptr(), n, hkv, d, k_pool.data_ptr(),
                                            v_pool.data_ptr(), k_scale.data_ptr(), v_scale.data_ptr(), capacity)
    if status:
        raise IndexError(f"KV slots out of the pool's range [0, {capacity})")
