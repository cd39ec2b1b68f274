"""One simulated instance: a FIFO prefill queue and/or a continuous decode batch, advanced as a fluid.

Between two events (a join, a leave, a prefill finishing) the batch is fixed, so every
iteration takes the same time: ``decode step (batch, KV bytes) + prefill chunk`` (the chunk
only while a prefill runs). The instance therefore jumps from event to event instead of
stepping token by token, and records each sequence's token gaps as (gap, count) segments.
A disaggregated prefill instance runs a whole prompt as one chunk; a colocated instance
(chunked prefill, the vLLM/Sarathi baseline) splits it into ``chunk_tokens`` pieces that ride
along with the decode steps, which is what stretches its token gaps.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from scheduler.cost_model import CostModel

EPS = 1e-9


@dataclass
class Record:
    rid: int
    arrival: float
    input_tokens: int
    output_tokens: int
    prefill: str = ""
    decode: str = ""
    rejected: bool = False
    predicted_hit: int = 0
    delivered_hit: int = 0
    first_token: float | None = None
    done: float | None = None
    join_wait: float = 0.0  # from the first token until the sequence joined a decode batch
    gaps: list[list[float]] = field(default_factory=list)  # [gap seconds, count]

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    def tbt(self) -> float | None:
        """Mean of the slowest 10% of this request's token gaps (Mooncake's TBT)."""
        segs = [[g, c] for g, c in self.gaps if c > EPS]
        if self.join_wait > 0 and segs:
            segs[0][1] -= 1
            segs.append([segs[0][0] + self.join_wait, 1.0])
        total = sum(c for _, c in segs)
        if total <= EPS:
            return None
        want = max(1.0, math.ceil(0.1 * total - EPS))
        acc = taken = 0.0
        for g, c in sorted(segs, key=lambda s: -s[0]):
            n = min(c, want - taken)
            if n <= 0:
                break
            acc, taken = acc + g * n, taken + n
        return acc / taken


@dataclass
class Job:
    rec: Record
    keys: list[int]
    fetch_from: str | None
    predicted_s: float
    iters_left: float = 0.0
    per_iter_s: float = 0.0


class Instance:
    def __init__(self, name: str, cost: CostModel, chunk_tokens: int | None):
        self.name, self.cost, self.chunk = name, cost, chunk_tokens
        self.queue: deque[Job] = deque()
        self.job: Job | None = None
        self.running: dict[int, list] = {}  # rid -> [tokens left, context tokens, record]
        self.waiting: deque[Record] = deque()
        self.last_t = 0.0
        self.iter_s = 0.0
        self.version = 0
        self.kv_bytes = 0.0
        self.pending_pred = 0.0  # predicted seconds of the queued (not started) prefills
        self.busy_s = 0.0  # seconds spent prefilling

    # -- time --------------------------------------------------------------------------------------
    def advance(self, t: float) -> None:
        dt = t - self.last_t
        if dt > 0 and self.iter_s > 0:
            n = dt / self.iter_s
            if self.job is not None:
                self.job.iters_left -= n
                self.busy_s += dt * (self.job.per_iter_s / self.iter_s)
            for entry in self.running.values():
                entry[0] -= n
                entry[1] += n
                gaps = entry[2].gaps
                if gaps and gaps[-1][0] == self.iter_s:
                    gaps[-1][1] += n
                else:
                    gaps.append([self.iter_s, n])
        self.last_t = t

    def recompute(self) -> None:
        self.kv_bytes = sum(self.cost.kv_bytes(int(e[1])) for e in self.running.values())
        step = self.cost.decode_step_time(len(self.running), self.kv_bytes)
        self.iter_s = step + (self.job.per_iter_s if self.job is not None else 0.0)
        self.version += 1

    def next_time(self) -> float | None:
        if self.iter_s <= 0:
            return None
        left = [e[0] for e in self.running.values()]
        if self.job is not None:
            left.append(self.job.iters_left)
        return self.last_t + max(0.0, min(left)) * self.iter_s if left else None

    def predicted_busy_until(self) -> float:
        current = self.last_t + max(0.0, self.job.iters_left) * self.iter_s if self.job else self.last_t
        return current + self.pending_pred

    # -- prefill -----------------------------------------------------------------------------------
    def start_job(self, job: Job, hit: int, fetched: int) -> None:
        n = job.rec.input_tokens
        hit = min(hit, n - 1)
        total = self.cost.prefill_time(n - hit, hit) + self.cost.transfer_time(self.cost.kv_bytes(fetched))
        iters = 1 if not self.chunk else max(1, math.ceil((n - hit) / self.chunk))
        job.iters_left, job.per_iter_s = float(iters), total / iters
        job.rec.delivered_hit = hit
        self.job = job
        self.pending_pred = max(0.0, self.pending_pred - job.predicted_s)

    def finished_job(self) -> Job | None:
        if self.job is not None and self.job.iters_left <= EPS:
            job, self.job = self.job, None
            return job
        return None

    # -- decode ------------------------------------------------------------------------------------
    def join(self, rec: Record, now: float) -> None:
        self.waiting.append(rec)
        self.admit(now)

    def admit(self, now: float) -> None:
        cap = self.cost.decode_kv_capacity_bytes or float("inf")
        while self.waiting and len(self.running) < self.cost.max_batch:
            rec = self.waiting[0]
            need = self.cost.kv_bytes(rec.input_tokens)
            if self.running and self.kv_bytes + need > cap:
                break
            self.waiting.popleft()
            rec.join_wait = now - rec.first_token
            self.running[rec.rid] = [float(rec.output_tokens - 1), float(rec.input_tokens), rec]
            self.kv_bytes += need

    def finished_seqs(self, now: float) -> list[Record]:
        done = [rid for rid, e in self.running.items() if e[0] <= EPS]
        out = []
        for rid in done:
            rec = self.running.pop(rid)[2]
            rec.done = now
            out.append(rec)
        return out
