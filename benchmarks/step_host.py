"""Host time of a decode step with the forward taken out: this tree against a git revision.

    OMP_NUM_THREADS=1 python -m benchmarks.step_host --base 017ba78 [--batch 128] [--context 8192] [--rounds 6]

A decode step replayed as a CUDA graph costs the device its forward and the host everything around it:
scheduling (KV reservations in every group), the graphs' static inputs, sampling and each request's
output. On the H200 (BENCHMARKS.md, device session 2) that host work was about as long as the device's at
batch 128 / 8k, so the GPU waited half of every step. Here the engine runs the graphs' path uncaptured
(``decode_graphs="eager"``) with the model replaced by a stub that returns zero logits, so only the host
work is left; ``cai-13b-skv``'s 24 KV groups on a model too small to matter. Each round runs one tree in a
fresh process (the revision from a temporary git worktree), rounds alternated; thread time per step over
64 steps (each sequence crosses a block boundary once), medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(batch: int, context: int, steps: int = 64) -> float:
    """Thread time per step (ms) of ``steps`` decode steps of ``batch`` sequences at ``context``, forward stubbed,
    using whichever tree's ``model`` package is imported."""
    import dataclasses
    import time

    import torch

    from benchmarks.gpu_engine import _decoding_engine, _pool_bytes
    from model.loader import build, random_state
    from model.presets import get_preset

    torch.set_num_threads(1)
    cfg = dataclasses.replace(get_preset("cai-13b-skv"), dim=128, n_heads=4, n_kv_heads=1, head_dim=32, ffn_dim=128,
                              vocab_size=1024, weights=None)
    model = build(cfg, random_state(cfg, 0))

    class NoForward:  # the logits of every row asked for, computed by nothing
        config = cfg

        def __call__(self, tokens, paged, logits_at=None, **_):
            return torch.zeros(tokens.shape[0] if logits_at is None else logits_at.shape[0], cfg.vocab_size)

    engine = _decoding_engine(model, batch, context, _pool_bytes(cfg, batch, context), steps + 8, graphs="eager")
    engine.model = engine.graphs.model = NoForward()
    for _ in range(3):
        engine.step()
    t = time.thread_time()
    for _ in range(steps):
        if len(engine.step()) != batch:
            raise RuntimeError("a step did not decode every sequence")
    return (time.thread_time() - t) / steps * 1e3


def _round(tree: Path, batch: int, context: int) -> float:
    """One measurement in a fresh process that imports ``tree``'s packages."""
    code = (f"import json, sys; sys.argv = ['step_host']; ns = {{'__name__': 'step_host_child', '__file__': {str(Path(__file__).resolve())!r}}}; "
            f"exec(compile(open({str(Path(__file__).resolve())!r}).read(), 'step_host.py', 'exec'), ns); "
            f"print(json.dumps(ns['measure']({batch}, {context})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"measuring {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="step_host_") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {args.base: base_tree, "this tree": ROOT}
            times = {k: [] for k in trees}
            for r in range(args.rounds):
                for label in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    times[label].append(_round(trees[label], args.batch, args.context))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    base, this = (statistics.median(times[k]) for k in trees)
    print(f"{machine()}; cai-13b-skv's 24 KV groups, batch {args.batch}, context {args.context}; host thread time "
          f"per decode step, forward stubbed, medians of {args.rounds} rounds")
    print(f"{args.base} {base:.2f} ms (rounds {', '.join(f'{t:.2f}' for t in times[args.base])}); this tree "
          f"{this:.2f} ms (rounds {', '.join(f'{t:.2f}' for t in times['this tree'])}); {base / this:.2f}x")


if __name__ == "__main__":
    main()
