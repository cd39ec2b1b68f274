"""``pdserve bench``: a load generator in the manner of vLLM's benchmark_serving, over gRPC or (with
``--backend openai``, ``pdserve.bench_http``) the OpenAI HTTP edge.

Arrivals are Poisson (``--request-rate``; inf = all at once) or replayed from a Mooncake trace
(timestamps and shared ``hash_ids`` prefixes, scaled down to the served model's context). A
semaphore caps concurrency. Reported: TTFT, TPOT (per-request mean gap after the first token),
ITL (every gap) and E2EL percentiles, request/token throughput, and goodput (requests/s meeting
the TTFT and TPOT SLOs). Every request ends as a completion or a counted gRPC status.
"""
from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from pdserve.client import Client


@dataclass
class Job:
    at_s: float
    prompt: list[int]
    max_tokens: int
    session: str = ""


@dataclass
class Result:
    ok: bool
    code: str = "OK"
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    e2e: float = 0.0
    prompt: int = 0
    output: int = 0
    cached: int = 0


def poisson_jobs(n: int, rate: float, input_len: int, max_tokens: int, vocab: int, seed: int) -> list[Job]:
    rng, t, jobs = random.Random(seed), 0.0, []
    for i in range(n):
        jobs.append(Job(t, [rng.randrange(3, vocab) for _ in range(input_len)], max_tokens))
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
    return jobs


def trace_jobs(path: str, n: int, tokens_per_block: int, max_prompt: int, max_tokens: int, time_scale: float,
               vocab: int) -> list[Job]:
    """Mooncake rows -> jobs: each hash id becomes ``tokens_per_block`` deterministic tokens, so
    rows that share hash ids share prompt prefixes (and hit the cache) as in the trace."""
    from kvstore.trace import TRACE_BLOCK, load_trace

    jobs = []
    for row in load_trace(path)[:n]:
        prompt = []
        for h in row["hash_ids"]:
            rng = random.Random(h)
            prompt += [rng.randrange(3, vocab) for _ in range(tokens_per_block)]
        keep = max(1, row["input_length"] * tokens_per_block // TRACE_BLOCK)
        out = max(1, min(max_tokens, row["output_length"] or max_tokens))
        jobs.append(Job(row["timestamp"] / 1000.0 * time_scale, prompt[:min(keep, max_prompt)], out))
    return jobs


def run_one(client: Client, job: Job, timeout_s: float) -> Result:
    t0 = time.perf_counter()
    times, r = [], Result(False, prompt=len(job.prompt))
    try:
        for msg in client.generate(job.prompt, session_id=job.session, timeout=timeout_s,
                                   max_tokens=job.max_tokens, ignore_eos=True):
            if msg.token_ids:
                times.extend([time.perf_counter()] * len(msg.token_ids))
            if msg.finished:
                r.ok, r.cached = True, msg.usage.cached_tokens
    except grpc.RpcError as e:
        r.code = e.code().name
    r.e2e = time.perf_counter() - t0
    r.output = len(times)
    r.ttft = times[0] - t0 if times else 0.0
    r.gaps = [b - a for a, b in zip(times, times[1:])]
    return r


def run(client, jobs: list[Job], concurrency: int, timeout_s: float, progress: bool = True
        ) -> tuple[list[Result], float]:
    """``client``: a gRPC ``Client``, or anything with ``run_job(job, timeout_s)`` (the OpenAI HTTP
    backend, ``pdserve.bench_http``)."""
    from tqdm import tqdm

    one = getattr(client, "run_job", None) or (lambda job, t: run_one(client, job, t))

    sem, results, lock = threading.Semaphore(concurrency), [], threading.Lock()
    bar = tqdm(total=len(jobs), disable=not progress, unit="req")

    def worker(job: Job) -> None:
        try:
            res = one(job, timeout_s)
        finally:
            sem.release()
        with lock:
            results.append(res)
            bar.update(1)

    threads, start = [], time.perf_counter()
    for job in jobs:
        delay = start + job.at_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sem.acquire()
        t = threading.Thread(target=worker, args=(job,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout_s + 30)
    bar.close()
    return results, time.perf_counter() - start


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def report(results: list[Result], wall_s: float, ttft_slo_s: float, tpot_slo_s: float,
           percentiles=(50, 90, 99)) -> str:
    ok = [r for r in results if r.ok]
    tpots = [(r.e2e - r.ttft) / (r.output - 1) for r in ok if r.output > 1]
    series = {"TTFT": [r.ttft for r in ok], "TPOT": tpots, "ITL": [g for r in ok for g in r.gaps],
              "E2EL": [r.e2e for r in ok]}
    good = [r for r in ok if r.ttft <= ttft_slo_s and (r.output < 2 or (r.e2e - r.ttft) / (r.output - 1) <= tpot_slo_s)]
    out_tokens = sum(r.output for r in ok)
    lines = ["============ Serving Benchmark Result ============",
             f"{'Successful requests:':<40}{len(ok)}",
             f"{'Failed requests:':<40}{len(results) - len(ok)} {dict(Counter(r.code for r in results if not r.ok))}",
             f"{'Benchmark duration (s):':<40}{wall_s:.2f}",
             f"{'Total input tokens:':<40}{sum(r.prompt for r in ok)}",
             f"{'Cached input tokens:':<40}{sum(r.cached for r in ok)}",
             f"{'Total generated tokens:':<40}{out_tokens}",
             f"{'Request throughput (req/s):':<40}{len(ok) / wall_s:.2f}",
             f"{'Output token throughput (tok/s):':<40}{out_tokens / wall_s:.2f}",
             f"{'Goodput (req/s):':<40}{len(good) / wall_s:.2f}  "
             f"(TTFT <= {ttft_slo_s * 1e3:.0f} ms, TPOT <= {tpot_slo_s * 1e3:.0f} ms)"]
    for name, xs in series.items():
        ms = [x * 1000 for x in xs]
        lines.append(f"{'Mean ' + name + ' (ms):':<40}{statistics.fmean(ms) if ms else 0.0:.2f}")
        lines += [f"{f'P{p} {name} (ms):':<40}{pct(ms, p):.2f}" for p in percentiles]
    lines.append("=" * 50)
    return "\n".join(lines)
