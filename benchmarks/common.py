"""Shared helpers for the benchmark scripts: timing medians, random prompts, machine description."""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    """Median wall time of ``runs`` calls (after none: the callers warm up themselves) and the last result."""
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def random_prompts(n: int, length: int, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    """Random in-vocabulary tokens (ids 100.. avoid the special tokens), as in ../shared/anchors.md."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def print_ab_table(figures: dict[str, dict[str, list[float]]], tokens: dict[str, list[int]], header: str,
                   names: tuple[str, str], labels: tuple[str, str]) -> None:
    """An A/B run's table: per figure the medians of both modes (``names``: keys of ``figures`` and
    ``tokens``; ``labels``: their column titles) and their ratio, then whether greedy tokens agreed."""
    (a, b), (la, lb) = names, labels
    print(header)
    print(f"| figure | {la} | {lb} | {lb} / {la} |\n|---|---:|---:|---:|")
    for key in figures[a]:
        x, y = statistics.median(figures[a][key]), statistics.median(figures[b][key])
        print(f"| {key} | {x:.1f} | {y:.1f} | {y / x:.2f} |")
    print(f"same greedy tokens (24, one prompt): {tokens[a] == tokens[b]}")


def in_process_prefill(model, engine_config):
    """An in-process store and a prefill worker over it: the handoffs a decode worker benchmark feeds on.
    Returns (store, prefill worker, model fingerprint)."""
    from kvstore.blocks import BlockSpec
    from kvstore.index import KVLayout
    from kvstore.keys import fingerprint_of
    from kvstore.store import KVStore
    from prefill.worker import PrefillWorker

    fp = fingerprint_of(model)
    store = KVStore(BlockSpec.of(model.config), fp, KVLayout.of(model.config))
    return store, PrefillWorker("p", model, store, fp, engine_config), fp


def decode_handoffs(worker, handoffs, params) -> float:
    """Seconds for a decode worker to take ``handoffs`` (submitted at once) and stream each to its end."""
    start = time.perf_counter()
    for h in handoffs:
        worker.submit(h, params)
    for h in handoffs:
        for _ in worker.stream(h.request_id):
            pass
    return time.perf_counter() - start

