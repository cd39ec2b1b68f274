"""The C kernels of this tree against a git revision's, interleaved in one process (bits and time).

    OMP_NUM_THREADS=1 python -m benchmarks.c_kernels_vs --base 585d1fb [--rounds 5]

Both libraries are built from their sources with ``kernels.cpu_fused``'s flags into a temporary folder;
each case (one layer of SmolLM2's attention: prefill of 512 / 2048 tokens, decode at batch x context;
the int8 linear's prologue at SmolLM2's widths) runs on each in turn, alternating which goes first.
Thread time, medians; the outputs must be equal.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from kernels import cpu_attention, cpu_fused, cpu_gemm
from model.quant import hadamard_block

ROOT = Path(__file__).resolve().parent.parent


def build(sources: dict[str, bytes], folder: Path):
    """Write ``sources`` (C files and the headers they include) into ``folder``, build them as
    ``kernels.cpu_fused`` builds its own, and load them."""
    for name, text in sources.items():
        (folder / name).write_bytes(text)
    cpu_fused.compile_library(cpu_fused.compiler(), [folder / n for n in sources if n.endswith(".c")], folder / "lib.so")
    return cpu_fused.load(folder / "lib.so")


def cases(h: int = 9, hkv: int = 3, d: int = 64, bs: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)

    def pools(nb):
        return (torch.randint(-127, 128, (nb, bs, hkv, d), dtype=torch.int8, generator=g),
                torch.randint(-127, 128, (nb, bs, hkv, d), dtype=torch.int8, generator=g),
                torch.rand(nb, bs, hkv, 1, generator=g) * 0.02, torch.rand(nb, bs, hkv, 1, generator=g) * 0.02)

    out = {}
    for t in (512, 2048):
        p, q = pools(t // bs + 1), torch.randn(t, h, d, generator=g)
        out[f"prefill {t}"] = lambda p=p, q=q, n=t // bs + 1: cpu_attention.paged_prefill_attention(
            q, *p, torch.arange(n), 0)
    for b, ctx in ((1, 512), (32, 512), (32, 2048)):
        nb = b * (ctx // bs + 1)
        p, q = pools(nb), torch.randn(b, h, d, generator=g)
        tables, lens = torch.randperm(nb, generator=g).reshape(b, -1), torch.full((b,), ctx)
        out[f"decode b{b} ctx{ctx}"] = lambda p=p, q=q, t=tables, n=lens: cpu_attention.paged_decode_attention(
            q, *p, t, n)
    for k in (576, 1536):
        for m in (1, 512, 2048):
            x = torch.randn(m, k, generator=g)
            out[f"prologue {m} x {k}"] = lambda x=x, k=k: cpu_fused.rotate_quantize_rows_float(x, hadamard_block(k))
    for (n, k), what in (((1536, 576), "gate"), ((576, 1536), "down"), ((49152, 576), "vocab")):
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        for m in (1, 4, 8):
            x = torch.randint(-127, 128, (m, k), generator=g).float()
            out[f"int8 GEMM {m} x {k} -> {n} ({what})"] = lambda x=x, w=w: cpu_gemm.int_mm_rows_c(x, w)
    return out


def _show(rev: str, path: str) -> bytes | None:
    """A file at a git revision, or None where the revision has no such file (it predates it)."""
    done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True)
    return done.stdout if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision whose C sources are the baseline")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [p.name for p in cpu_fused.SOURCES + cpu_fused.HEADERS]
    with tempfile.TemporaryDirectory() as tmp:
        libs = {}
        for label, read in (("base", lambda n: _show(args.base, f"kernels/{n}")),
                            ("this tree", lambda n: (ROOT / "kernels" / n).read_bytes())):
            folder = Path(tmp) / label.replace(" ", "_")
            folder.mkdir()
            files = {n: read(n) for n in names}
            libs[label] = build({n: text for n, text in files.items() if text is not None}, folder)
        real = cpu_fused.library
        print(f"{machine()}; base {args.base}; thread time, medians of {args.rounds}\n")
        print(f"| case | {args.base} ms | this tree ms | speed-up | same bits |\n|---|---|---|---|---|")
        try:
            for case, fn in cases().items():
                times, outs = {k: [] for k in libs}, {}
                for r in range(args.rounds):
                    for label in (list(libs) if r % 2 == 0 else list(libs)[::-1]):
                        cpu_fused.library = lambda lib=libs[label]: lib
                        t = time.thread_time()
                        outs[label] = fn()
                        times[label].append(time.thread_time() - t)
                base, this = (1e3 * statistics.median(times[k]) for k in libs)
                same = all(torch.equal(a, b) for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in outs.values())))
                print(f"| {case} | {base:.2f} | {this:.2f} | {base / this:.2f}x | {same} |")
        finally:
            cpu_fused.library = real


if __name__ == "__main__":
    main()
