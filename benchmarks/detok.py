"""Host time of detokenizing a decode step: the whole output decoded again vs ``TextSoFar``'s last few tokens.

    OMP_NUM_THREADS=1 python -m benchmarks.detok [--batch 128] [--lengths 64,256,1000,4000] [--rounds 5]

The engine (with a tokenizer) and the gateway keep each request's text up to date at every token. One step of
a batch of ``batch`` requests whose outputs are ``length`` tokens long is timed both ways on SmolLM2's
tokenizer over real text (this repository's README), rounds alternated, thread time, medians; both ways
are checked to give the same text.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.common import machine
from model.tokenizer import TextSoFar, Tokenizer
from model.weights import smollm2_gguf_path

ROOT = Path(__file__).resolve().parent.parent


def step_ms(decode, ids: list[int], length: int, batch: int, incremental: bool, steps: int = 16) -> float:
    """Thread time of ``steps`` steps of ``batch`` requests each adding its token ``length``, per step."""
    texts = []
    if incremental:
        for _ in range(batch):
            texts.append(TextSoFar(decode))
            texts[-1].add(ids[:length - steps])
    t = time.thread_time()
    for k in range(length - steps, length):
        for r in range(batch):
            got = texts[r].add(ids[k:k + 1]) if incremental else decode(ids[:k + 1])
    elapsed = time.thread_time() - t
    assert got == decode(ids[:length])
    return elapsed / steps * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lengths", default="64,256,1000,4000")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    tok = Tokenizer.from_gguf(smollm2_gguf_path())
    ids = tok.encode((ROOT / "README.md").read_text())
    lengths = [int(x) for x in args.lengths.split(",")]
    if max(lengths) > len(ids):
        raise SystemExit(f"--lengths: the README gives {len(ids)} tokens, fewer than {max(lengths)}")
    print(f"{machine()}; batch {args.batch}; thread time per decode step, medians of {args.rounds} rounds")
    print("| output tokens | whole output decoded ms | TextSoFar ms | speed-up |")
    print("|---|---|---|---|")
    for length in lengths:
        times = {False: [], True: []}
        for r in range(args.rounds):
            for incremental in ((False, True) if r % 2 == 0 else (True, False)):
                times[incremental].append(step_ms(tok.decode, ids, length, args.batch, incremental))
        full, inc = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {length} | {full:.2f} | {inc:.2f} | {full / inc:.1f}x |")


if __name__ == "__main__":
    main()
