"""The int8 linear's prologue as one C call (``kernels.cpu_fused``) against the torch ops, in engine steps.

    python -m benchmarks.fused_prologue [--rounds 3] [--batches 1,8] [--context 512] [--prefill 512]

One process, SmolLM2 int8; the two prologues alternate round by round (torch, fused, torch, ...),
so drift on a shared machine hits both alike. Per round: the median decode step at each batch
(``benchmarks.decode_steps``) and one prefill of ``--prefill`` tokens. Also checks that both give
the same greedy tokens on one prompt. Prints medians over rounds and fused / torch ratios. First,
the prologue alone at SmolLM2's widths, in this thread's CPU time (``time.thread_time``: what
another process on the same cores cannot inflate), median of 5 batches of calls.
"""
from __future__ import annotations

import argparse
import statistics
import time

import kernels
from benchmarks.common import machine, print_ab_table, random_prompts
from benchmarks.decode_steps import step_time
from benchmarks.profile_steps import prefill_engine
from model.engine import Engine, SamplingParams


def prefill_s(model, tokens: int) -> float:
    engine = prefill_engine(model, 1, tokens)
    t = time.perf_counter()
    engine.step()
    return time.perf_counter() - t


def prologue_alone(rows: tuple[int, ...] = (1, 32, 512)) -> list[tuple[int, int, int, float, float]]:
    """(K, block, M, torch us, fused us) per call, CPU time of this thread."""
    import torch

    from model.quant import hadamard_block, hadamard_rotate

    def cpu_us(fn, n: int) -> float:
        fn()
        runs = []
        for _ in range(5):
            t0 = time.thread_time()
            for _ in range(n):
                fn()
            runs.append((time.thread_time() - t0) / n * 1e6)
        return statistics.median(runs)

    out = []
    for k in (576, 1536):
        block = hadamard_block(k)
        for m in rows:
            x = torch.randn(m, k)
            n = max(2, 4000 // m)
            out.append((k, block, m, cpu_us(lambda: kernels.quantize_rows_float(hadamard_rotate(x, block)), n),
                        cpu_us(lambda: kernels.rotate_quantize_rows_float(x, block), n)))
    return out


def greedy(model, n: int = 24) -> list[int]:
    engine = Engine(model)
    engine.eos_ids = set()
    rid = engine.add_request(random_prompts(1, 200, model.config.vocab_size, seed=7)[0], SamplingParams(max_tokens=n))
    return [t for out in engine.stream() if out.request_id == rid for t in out.token_ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=512)
    a = ap.parse_args()
    from model.loader import load

    if not kernels.cpu_fused.available():
        raise SystemExit("the fused prologue did not build here (see the warning above): nothing to compare")
    print("| prologue alone: K (block) | rows | torch ops us | fused C us | fused / torch |\n|---|---:|---:|---:|---:|")
    for k, block, m, slow, fast in prologue_alone():
        print(f"| {k} ({block}) | {m} | {slow:.0f} | {fast:.0f} | {fast / slow:.2f} |")
    model = load(a.model).model
    built = kernels.fused_prologue
    modes = {"torch": lambda x: False, "fused": built}
    batches = [int(b) for b in a.batches.split(",")]
    figures: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    tokens = {}
    for _ in range(a.rounds):
        for mode, choose in modes.items():
            kernels.fused_prologue = choose
            for b in batches:
                figures[mode].setdefault(f"decode step b{b} ctx{a.context} ms", []).append(
                    step_time(model, b, a.context) * 1e3)
            figures[mode].setdefault(f"prefill {a.prefill} tokens s", []).append(prefill_s(model, a.prefill))
            tokens.setdefault(mode, greedy(model))
    kernels.fused_prologue = built
    print_ab_table(figures, tokens, f"{machine()}, {a.model} int8, {time.strftime('%Y-%m-%d %H:%M')}, "
                   f"median of {a.rounds} alternated rounds", ("torch", "fused"), ("torch ops", "fused C"))


if __name__ == "__main__":
    main()
