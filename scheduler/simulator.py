"""Discrete-event replay of a request trace through simulated prefill and decode instances.

The same policy objects as the live Conductor place every request (design invariant 6), on a
``ClusterView`` the simulator keeps current: prefill queues (predicted busy-until), decode
batches (sequences, KV bytes, finish rate) and per-instance caches in the real prefix index
with the real chained block keys. Prefill instances run FIFO; a prefill starts from the
instance's own cached prefix, or from a prefix fetched from another instance when the policy
says so (which replicates it). KV streams to decode layer by layer during prefill, so only
the part of the transfer longer than the prefill delays the decode join. Decode instances
run continuous batching (``sim_instance``). ``colocated=True`` is the baseline: every
instance prefills (in chunks riding along decode steps) and decodes its own requests.

Requests are conserved: each one ends either rejected or completed.
"""
from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass

from scheduler.cost_model import CostModel
from scheduler.placement import ClusterView, Placement, PlacementRequest, Reject
from scheduler.sim_instance import Instance, Job, Record


@dataclass(frozen=True)
class SimRequest:
    arrival: float  # seconds
    input_tokens: int
    output_tokens: int
    keys: tuple[int, ...]  # chained block keys of the prompt
    session_id: str | None = None


@dataclass(frozen=True)
class SimConfig:
    n_prefill: int = 8
    n_decode: int = 8
    block_size: int = 512
    cache_tokens: int | None = 2_000_000  # per prefill instance; None = unbounded
    speed: float = 1.0  # arrival-rate scaling: 2.0 replays the trace twice as fast
    colocated: bool = False
    chunk_tokens: int = 2048  # colocated chunked prefill
    n_nodes: int = 0  # 0: each prefill instance its own cache; n: prefill i on node i % n, one cache per node

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError(f"speed must be positive, got {self.speed}")
        if self.n_prefill < 1 or (self.n_decode < 1 and not self.colocated):
            raise ValueError(f"need at least one prefill and one decode instance, got {self.n_prefill}P {self.n_decode}D")


class Simulator:
    def __init__(self, requests: list[SimRequest], policy, cost: CostModel, config: SimConfig = SimConfig()):
        self.requests, self.policy, self.cost, self.cfg = requests, policy, cost, config
        chunk = config.chunk_tokens if config.colocated else None
        n_inst = config.n_prefill + config.n_decode if config.colocated else config.n_prefill
        pre = [f"p{i}" for i in range(n_inst)]
        dec = pre if config.colocated else [f"d{i}" for i in range(config.n_decode)]
        self.inst = {n: Instance(n, cost, chunk) for n in dict.fromkeys(pre + dec)}
        nodes = {p: f"node{i % config.n_nodes}" for i, p in enumerate(pre)} if config.n_nodes else {}
        self.view = ClusterView(list(pre), list(dec), block_size=config.block_size, colocated=config.colocated,
                                nodes=nodes)
        per_holder = -(-len(pre) // config.n_nodes) if config.n_nodes else 1  # same cache in all
        cap = None if config.cache_tokens is None else max(1, per_holder * config.cache_tokens // config.block_size)
        for n in pre:
            if self.view.node_of(n) not in self.view.caches:
                self.view.attach_cache(n, cap)
        self.records: list[Record] = []
        self.decision_s: list[float] = []
        self._events: list = []
        self._seq = itertools.count()
        self._lifetime = 0.0  # EWMA of decode durations, for the finish-rate estimate

    def _push(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def run(self) -> list[Record]:
        for i, r in enumerate(self.requests):
            self._push(r.arrival / self.cfg.speed, "arrive", i)
        while self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            if kind == "arrive":
                self._arrive(t, payload)
            elif kind == "join":
                self._join(t, *payload)
            elif kind == "tick":
                name, version = payload
                if self.inst[name].version == version:
                    self._tick(t, name)
        return self.records

    # -- events ----------------------------------------------------------------------------------
    def _arrive(self, t: float, i: int) -> None:
        r = self.requests[i]
        rec = Record(i, t, r.input_tokens, r.output_tokens)
        self.records.append(rec)
        self.view.now = t
        req = PlacementRequest(str(i), r.input_tokens, r.session_id, block_keys=r.keys)
        t0 = time.perf_counter()
        placement = self.policy.place(req, self.view)
        self.decision_s.append(time.perf_counter() - t0)
        if isinstance(placement, Reject):
            rec.rejected = True
            return
        rec.prefill, rec.decode, rec.predicted_hit = placement.prefill, placement.decode, placement.predicted_hit_tokens
        self._enqueue(t, rec, list(r.keys), placement)

    def _enqueue(self, t: float, rec: Record, keys: list[int], placement: Placement) -> None:
        inst = self.inst[placement.prefill]
        n = rec.input_tokens
        cached = min(placement.predicted_hit_tokens, n - 1)
        predicted = self.cost.prefill_time(n - cached, cached)
        inst.advance(t)
        inst.queue.append(Job(rec, keys, placement.fetch_from, predicted))
        inst.pending_pred += predicted
        if not self.cfg.colocated:
            ds = self.view.decode_state[placement.decode]
            ds.incoming += 1
            ds.incoming_kv_bytes += self.cost.kv_bytes(n)
        self._tick(t, inst.name)

    def _start_next(self, inst: Instance) -> None:
        if inst.job is not None or not inst.queue:
            return
        job = inst.queue.popleft()
        cache = self.view.prefill_state[inst.name].cache
        n = job.rec.input_tokens
        local = cache.match_keys(job.keys, n).tokens
        hit, fetched = local, 0
        if job.fetch_from is not None:
            src = self.view.caches[self.view.node_of(job.fetch_from)].match_keys(job.keys, n).tokens
            if src > local:
                hit, fetched = src, src - local
        inst.start_job(job, hit, fetched)

    def _tick(self, t: float, name: str) -> None:
        inst = self.inst[name]
        inst.advance(t)
        job = inst.finished_job()
        if job is not None:
            self._prefilled(t, inst, job)
        for rec in inst.finished_seqs(t):
            self._lifetime = 0.9 * self._lifetime + 0.1 * (t - rec.first_token) if self._lifetime else t - rec.first_token
        inst.admit(t)
        self._start_next(inst)
        inst.recompute()
        self._publish(inst)
        nxt = inst.next_time()
        if nxt is not None:
            self._push(max(nxt, t), "tick", (name, inst.version))

    def _prefilled(self, t: float, inst: Instance, job: Job) -> None:
        rec = job.rec
        rec.first_token = t
        self.view.cache_insert(inst.name, job.keys, rec.input_tokens)
        if rec.output_tokens <= 1:
            rec.done = t
            self._leave_incoming(rec)
            return
        if self.cfg.colocated:
            inst.join(rec, t)
            return
        prefill_s = job.per_iter_s
        exposed = max(0.0, self.cost.transfer_time(self.cost.kv_bytes(rec.input_tokens)) - prefill_s)
        self._push(t + exposed, "join", (rec.decode, rec))

    def _leave_incoming(self, rec: Record) -> None:
        if not self.cfg.colocated:
            ds = self.view.decode_state[rec.decode]
            ds.incoming -= 1
            ds.incoming_kv_bytes -= self.cost.kv_bytes(rec.input_tokens)

    def _join(self, t: float, name: str, rec: Record) -> None:
        self._leave_incoming(rec)
        inst = self.inst[name]
        inst.advance(t)
        inst.join(rec, t)
        self._tick(t, name)

    def _publish(self, inst: Instance) -> None:
        """Mirror the instance into the policy's view."""
        if inst.name in self.view.prefill_state:
            self.view.prefill_state[inst.name].busy_until = inst.predicted_busy_until()
            self.view.prefill_state[inst.name].queued = len(inst.queue) + (inst.job is not None)
        if inst.name in self.view.decode_state:
            ds = self.view.decode_state[inst.name]
            ds.running = len(inst.running) + len(inst.waiting)
            ds.kv_bytes = inst.kv_bytes + sum(self.cost.kv_bytes(r.input_tokens) for r in inst.waiting)
            ds.finish_rate = ds.running / self._lifetime if self._lifetime else 0.0
