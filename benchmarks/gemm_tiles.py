"""W8A8 GEMM tile sizes by measurement, at the row counts a decode step runs (the device session's ``tiles`` stage).

The wrapper's rule (``kernels.triton_gemm._tiles``) was written without a GPU. The device session's profile
at batch 128 / 8k showed the GEMMs streaming the weights at ~37% of the copy ceiling: with 128-wide
column tiles the 5120-wide layers launch 40 programs on 132 SMs. This sweeps tile shapes per (layer, M)
on ``cai-13b-skv``'s shapes, checks each result against ``torch._int_mm`` (exact: int32 sums), re-times
the fastest few beside the rule's in interleaved rounds and reports the medians. ``kernels.triton_gemm.TILES`` takes the winners, so the engine
stage can time decode steps with them against the rule in the same run.
"""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.kernels import gemm_shapes


def bench(fn) -> float:
    """Median seconds, shorter than ``benchmarks.kernels.bench`` (hundreds of candidates to time)."""
    if not torch.cuda.is_available():
        from benchmarks.kernels import bench as host_bench

        return host_bench(fn)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median") / 1e3


def candidates(m: int, dry_run: bool = False) -> list[dict]:
    """Tile shapes for ``m`` rows: row tiles from 16 up to ``m`` (at most 128), column tiles 32-128, depth 128
    or 256, 3 or 4 stages; warps by tile area; and six split-K shapes. A dry run takes three (one split)."""
    block_ms = [b for b in (16, 32, 64, 128) if b == 16 or b <= max(16, m)]
    out = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=8 if bm * bn >= 128 * 64 else 4,
                num_stages=st)
           for bm in block_ms for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4)]
    # split-K: the K steps of each output tile across 2-8 programs (5120-wide layers launch 40-80 column tiles
    # on 132 SMs at decode row counts), with the smallest row tile that holds ``m``
    bm = next(b for b in block_ms[::-1] if b <= max(16, m)) if m <= 128 else 128
    out += [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=8 if bm * bn >= 128 * 64 else 4,
                 num_stages=4, SPLIT_K=split)
            for bn, bk, split in ((64, 256, 2), (64, 256, 4), (128, 256, 2), (128, 256, 4), (64, 128, 4), (64, 128, 8))]
    if dry_run:
        return [dict(out[0], BLOCK_K=32, num_stages=1), dict(out[1], BLOCK_K=32, num_stages=1),
                dict(out[0], BLOCK_K=32, num_stages=1, SPLIT_K=2)]
    return out


def sweep(dev: torch.device, ms: tuple[int, ...], preset: str = "cai-13b-skv", budget_s: float = 150.0,
          dry_run: bool = False, finalists: int = 3, rounds: int = 5) -> dict:
    """Every candidate per (layer, M) once (a screen, until the budget is spent), then the ``finalists``
    fastest exact ones, the rule's tiles and the previous rule's re-timed in turn over ``rounds`` rounds:
    one timing of a 20-100 us kernel is noisy (the first device sweep timed one tile at 36 and 56 us),
    medians of interleaved rounds are not. Returns the screen's rows and, per (M, N, K), the medians."""
    from kernels import triton_gemm as tg

    deadline = time.monotonic() + budget_s
    # the layers with the most weight bytes first (they decide a step), so a spent budget loses the least
    shapes = sorted(gemm_shapes(preset), key=lambda s: -s[1] * s[2]) if not dry_run else [("tiny", 48, 64)]
    rows, best, stopped = [], [], None
    for name, n, k in shapes:
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
        ws = torch.rand(n, device=dev)
        for m in ms:
            case = _Case(tg, m, n, k, wq, ws, dev)
            screen = []
            for cfg in candidates(m, dry_run):
                if time.monotonic() > deadline:
                    stopped = f"budget spent at {name} M={m}"
                    break
                row = {"layer": name, "m": m, "n": n, "k": k, **cfg, **case.screen(cfg)}
                rows.append(row)
                if row.get("exact"):
                    screen.append((row["ms"], cfg))
            if screen:
                best.append({"layer": name, "m": m, "n": n, "k": k,
                             **case.final([c for _, c in sorted(screen, key=lambda t: t[0])[:finalists]], rounds)})
                b = best[-1]
                print(f"{name} M={m}: rule {b['rule_ms']:.4f} ms, previous rule {b['previous_ms']:.4f} ms, best "
                      f"{b['best_ms']:.4f} ms ({b['speedup']:.2f}x the rule) with {b['tiles']}", flush=True)
            if stopped:
                break
        if stopped:
            break
    return {"rows": rows, "best": best, "stopped": stopped}


class _Case:
    """One (M, N, K): random int8 rows, the exact product to check against, and timings under chosen tiles."""

    def __init__(self, tg, m: int, n: int, k: int, wq: torch.Tensor, ws: torch.Tensor, dev: torch.device):
        self.tg, self.key, self.wq, self.ws = tg, (m, n, k), wq, ws
        self.xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
        self.xs = torch.rand(m, 1, device=dev)
        self.want = (torch._int_mm(torch.nn.functional.pad(self.xq, (0, 0, 0, max(0, 17 - m))), wq.t())[:m]
                     if dev.type == "cuda" else self.xq.int() @ wq.int().t())  # _int_mm needs M > 16 on CUDA
        self.tg.TILES.pop(self.key, None)
        self.rule = self.tg._tiles(m, n, k, dev)

    def _run(self, cfg: dict, out_dtype: torch.dtype) -> torch.Tensor:
        self.tg.TILES[self.key] = cfg
        try:
            return self.tg.int8_matmul(self.xq, self.xs, self.wq, self.ws, out_dtype=out_dtype)
        finally:
            self.tg.TILES.pop(self.key, None)

    def time_ms(self, cfg: dict) -> float:
        return bench(lambda: self._run(cfg, torch.bfloat16)) * 1e3

    def screen(self, cfg: dict) -> dict:
        try:
            exact = torch.equal(self._run(cfg, torch.int32), self.want.to(torch.int32))
            return {"ms": self.time_ms(cfg), "exact": exact}
        except Exception as e:  # noqa: BLE001 - a tile the compiler rejects (shared memory) is skipped
            return {"error": type(e).__name__}

    def final(self, finalists: list[dict], rounds: int) -> dict:
        previous = previous_rule((self.key[0],))[0]["tiles"]
        arms = [self.rule, previous] + [c for c in finalists if c not in (self.rule, previous)]
        times = [[] for _ in arms]
        for r in range(rounds):
            for i in range(len(arms)):  # rotated each round, so no arm always runs first
                j = (i + r) % len(arms)
                times[j].append(self.time_ms(arms[j]))
        med = [statistics.median(t) for t in times]
        i = min(range(len(arms)), key=med.__getitem__)
        return {"rule_ms": med[0], "previous_ms": med[1], "best_ms": med[i], "speedup": med[0] / med[i],
                "tiles": arms[i], "rule_tiles": self.rule, "arms": [{"tiles": a, "ms": t} for a, t in zip(arms, times)]}


def use(best: list[dict]) -> None:
    """Make ``kernels.triton_gemm`` launch the measured winners (those faster than the rule)."""
    from kernels import triton_gemm as tg

    for b in best:
        if b["speedup"] > 1.0:
            tg.TILES[(b["m"], b["n"], b["k"])] = b["tiles"]


def previous_rule(ms: tuple[int, ...], preset: str = "cai-13b-skv") -> list[dict]:
    """The wrapper's tiles before the H200 sweep (above 16 rows 128-deep K steps, and 128-wide column tiles
    above 64; at most 16 rows 32-wide columns), in ``use``'s form: the engine stage times decode steps with
    them against the current rule, in the same run."""
    out = []
    for m in ms:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
        if m <= 16:
            cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
        else:
            cfg = dict(BLOCK_M=block_m, BLOCK_N=64 if m <= 64 else 128, BLOCK_K=128, GROUP_M=8,
                       num_warps=4 if block_m <= 64 else 8, num_stages=4)
        out += [{"m": m, "n": n, "k": k, "speedup": float("inf"), "tiles": cfg} for _, n, k in gemm_shapes(preset)]
    return out
