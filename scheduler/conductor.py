"""The live Conductor: places every request of a running cluster with a policy object (the same
objects the simulator runs) and keeps the policy's ``ClusterView`` current.

What feeds the view:
- placements: a prefill worker's predicted busy-until grows by the request's predicted prefill,
  a decode worker's incoming sequences by one;
- prefill reports (the ``Handoff``): the blocks that worker published are now local to it,
  the delivered cache hit is recorded next to the predicted one (design invariant 5), in the
  same unit: tokens of whole blocks (the view knows block keys, not the partial tail a store
  matches token by token); the partial-block tokens delivered on top are counted apart;
- finished requests: the conversation's KV (prompt + answer, published by the decode worker
  into the same node's store) is attributed to the prefill worker that served the request, so
  the next turn finds its prefix there;
- worker load reports (running / waiting sequences) and the store's ``removed`` events, which
  drop blocks from every worker's index;
- each worker's observed speed (a prefill worker's busy seconds for each prompt it hands off, a decode
  worker's mean step time in its load reports) against the cost model's: its ``slowdown`` scales what the
  policies predict for it, and a prefill worker's ``transfer_slowdown`` (its fetches of a prefix from another
  node's store) the predicted transfer (``scheduler.correction``; ``correct=False`` keeps the model as it
  is). Observed TTFTs are kept next to the predicted ones, so ``stats()`` says how far the predictions are off;
- liveness: a worker marked down (dead, restarting or not answering) leaves placement until it is
  marked up again; a store that restarted empty makes the Conductor forget every block (of its node).

On a cluster of several Ray nodes (``nodes``: worker -> node), the view's caches are per node: a
prefill worker's published blocks belong to its node's store, a finished conversation to the decode
worker's node (it publishes into its own store), a store's events touch only its node's cache, and a
lost node is forgotten whole (``forget_node``). Cross-node fetches (a placement's ``fetch_from``, a
handoff from a prefill node to another decode node) feed the hot-block ``replication`` policy,
whose copy orders the cluster carries out (``take_replications``, ``replicated``).

A plain thread-safe class: ``pdserve.cluster.LocalCluster`` calls it from its submit threads.
"""
from __future__ import annotations

import collections
import statistics
import threading
import time
from dataclasses import dataclass

from kvstore.keys import block_keys
from scheduler.correction import CostCorrection
from scheduler.cost_model import CostModel
from scheduler.placement import ClusterView, Placement, PlacementRequest, Reject
from scheduler.replication import HotBlockReplication, Replicate
from scheduler.view import BlockLocator

NO_LIVE_WORKER = "no live prefill or no live decode worker"  # a Reject that waiting can cure


@dataclass
class Outstanding:
    placement: Placement
    predicted_s: float
    prompt_tokens: int
    kv_bytes: float
    placed_at: float = 0.0
    prefilled: bool = False  # reported by its prefill worker (its decode slot went from incoming to running)


class Conductor:
    def __init__(self, policy, cost: CostModel, prefill: list[str], decode: list[str], block_size: int,
                 fingerprint: int, clock=time.monotonic, nodes: dict[str, str] | None = None,
                 replication: HotBlockReplication | None = None, correct: bool = True):
        self.policy, self.cost, self.clock = policy, cost, clock
        self.correction = CostCorrection() if correct else None
        self.ttfts: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)  # (observed, predicted)
        self.view = ClusterView(list(prefill), list(decode), block_size=block_size, fingerprint=fingerprint,
                                nodes=dict(nodes or {}))
        for name in [*prefill, *(decode if nodes else [])]:  # a decode-only node's store holds blocks too
            if self.view.node_of(name) not in self.view.caches:
                self.view.attach_cache(name, None)
        self.replication = replication
        self.replications: list[Replicate] = []  # copies ordered, not yet taken by the cluster
        self.replicated_blocks = 0
        self.remote_hit_tokens = 0  # predicted hits placed to be fetched from another node
        self.lock = threading.Lock()
        self.outstanding: dict[str, Outstanding] = {}
        self.pending_s: dict[str, float] = {}  # per prefill worker: predicted seconds of the prompts placed there
        self.block_size = block_size
        self.predicted_hit_tokens = 0
        self.delivered_hit_tokens = 0  # whole blocks, as predicted
        self.delivered_partial_tokens = 0  # the partially matched block's tokens on top
        self.requests = 0
        self.rejected = 0
        self.placements: dict[str, str] = {}  # request id -> prefill worker (last 10k)
        self.on_disk: set[tuple[str, int]] = set()  # (node, key) of blocks on a store's disk tier
        self.all_prefill, self.all_decode = list(prefill), list(decode)
        self.down: set[str] = set()

    # -- liveness --------------------------------------------------------------------------------
    def mark_down(self, name: str) -> None:
        """Stop placing on ``name`` (dead, restarting or not answering)."""
        with self.lock:
            self.down.add(name)
            self._live()

    def mark_up(self, name: str) -> None:
        """``name`` is back in placement (restarted, or answering again): it starts over in the correction (from
        its start-up timing, else its peers' speed), not judged by the figure of a process that died or of a step
        that stuck."""
        with self.lock:
            self.down.discard(name)
            self._live()
            if self.correction is not None:
                for role in ("prefill", "decode", "transfer"):
                    self.correction.forget(role, name)
                self._correct()

    def _live(self) -> None:
        self.view.prefill = [p for p in self.all_prefill if p not in self.down]
        self.view.decode = [d for d in self.all_decode if d not in self.down]

    def can_serve(self) -> bool:
        with self.lock:
            return bool(self.view.prefill) and bool(self.view.decode)

    def forget_blocks(self, node: str | None = None) -> None:
        """A store restarted empty: nobody holds any of its blocks (``node``: that node's store; None:
        the only store, so no worker holds any block any more)."""
        with self.lock:
            if node is not None and self.view.nodes:
                self.view.forget_holder(node)
                self.on_disk = {(n, k) for n, k in self.on_disk if n != node}
                return
            self.view.locator = BlockLocator()
            self.on_disk.clear()
            for name in list(self.view.caches):
                self.view.attach_cache(name, None)

    def forget_node(self, node: str) -> None:
        """A node is gone with its workers and store: out of placement for good, its blocks forgotten."""
        with self.lock:
            gone = [w for w, n in self.view.nodes.items() if n == node]
            self.down.update(gone)
            self.all_prefill = [p for p in self.all_prefill if p not in gone]
            self.all_decode = [d for d in self.all_decode if d not in gone]
            self._live()
            self.view.forget_holder(node)
            self.on_disk = {(n, k) for n, k in self.on_disk if n != node}
            self.replications = [r for r in self.replications if node not in (r.source, r.target)]
            if self.replication is not None:
                self.replication.forget(node)

    def place(self, request: PlacementRequest) -> Placement | Reject:
        with self.lock:
            now = self.view.now = self.clock()
            self.requests += 1
            if not self.view.prefill or not self.view.decode:
                self.rejected += 1
                return Reject(NO_LIVE_WORKER)
            got = self.policy.place(request, self.view)
            if isinstance(got, Reject):
                self.rejected += 1
                return got
            n = request.prompt_tokens
            cached = min(got.predicted_hit_tokens, max(0, n - 1))
            ps = self.view.prefill_state[got.prefill]
            predicted = self.cost.prefill_time(n - cached, cached) * ps.slowdown
            ps.busy_until = max(now, ps.busy_until) + predicted
            ps.queued += 1
            self.pending_s[got.prefill] = self.pending_s.get(got.prefill, 0.0) + predicted
            ds = self.view.decode_state[got.decode]
            kv = self.cost.kv_bytes(n)
            ds.incoming += 1
            ds.incoming_kv_bytes += kv
            self.outstanding[request.request_id] = Outstanding(got, predicted, n, kv, now)
            self.predicted_hit_tokens += got.predicted_hit_tokens
            if got.fetch_from is not None:
                self.remote_hit_tokens += got.predicted_hit_tokens
            self.placements[request.request_id] = got.prefill
            if len(self.placements) > 10_000:
                self.placements.pop(next(iter(self.placements)))
            return got

    def prefilled(self, request_id: str, keys: list[int], kv_tokens: int, cached_tokens: int,
                  busy_s: float | None = None, remote_tokens: int = 0, fetch_s: float | None = None) -> None:
        """The prefill worker's report: its published blocks, the hit it delivered, (``busy_s``) its engine's
        busy seconds since its previous prompt, which the correction sets against the model's time for this one,
        and (``fetch_s``) how long loading the prefix took when ``remote_tokens`` of it came from another node's
        store, set against the model's transfer time for them."""
        with self.lock:
            out = self.outstanding.get(request_id)
            if out is None or out.prefilled:
                return
            out.prefilled = True
            p, now = out.placement.prefill, self.clock()
            self._dequeue(out, now)
            if out.placement.predicted_ttft_s:
                self.ttfts.append((now - out.placed_at, out.placement.predicted_ttft_s))
            if self.correction is not None:
                n = out.prompt_tokens
                done = min(cached_tokens, max(0, n - 1))
                if busy_s is not None:
                    self.correction.prefilled(p, busy_s, self.cost.prefill_time(n - done, done), now)
                    self._correct("prefill")
                if remote_tokens > 0 and fetch_s is not None:
                    self.correction.transferred(p, fetch_s, self.cost.transfer_time(self.cost.kv_bytes(remote_tokens)),
                                                now)
                    self._correct("transfer")
            whole = cached_tokens // self.block_size * self.block_size
            self.delivered_hit_tokens += whole
            self.delivered_partial_tokens += cached_tokens - whole
            if keys:
                self.view.cache_insert(p, keys, kv_tokens)
            self._count_fetches(out.placement, keys, cached_tokens)
            ds = self.view.decode_state[out.placement.decode]
            ds.incoming = max(0, ds.incoming - 1)
            ds.incoming_kv_bytes = max(0.0, ds.incoming_kv_bytes - out.kv_bytes)
            ds.running += 1
            ds.kv_bytes += out.kv_bytes

    def _dequeue(self, out: Outstanding, now: float) -> None:
        """``out`` leaves its prefill worker's predicted queue (under the lock): the worker is busy from now
        for the predicted time of the prompts still placed on it, as in the simulator (subtracting the
        finished prompt's time from the old busy-until instead lost the time since, so a queue read shorter
        with every completion: under load the predicted TTFT fell behind the observed by minutes)."""
        p = out.placement.prefill
        ps = self.view.prefill_state[p]
        ps.queued = max(0, ps.queued - 1)
        self.pending_s[p] = max(0.0, self.pending_s.get(p, 0.0) - out.predicted_s) if ps.queued else 0.0
        ps.busy_until = now + self.pending_s[p]

    def finished(self, request_id: str, tokens: list[int] | None = None) -> None:
        """The request left the cluster: decode finished it, or it ended (cancelled, failed, lost and placed
        again) before its prefill was reported, when it leaves the prefill queue and the decode worker's
        incoming sequences instead. ``tokens`` (prompt + answer) is what its decode worker published."""
        with self.lock:
            out = self.outstanding.pop(request_id, None)
            if out is None:
                return
            ds = self.view.decode_state[out.placement.decode]
            if not out.prefilled:
                self._dequeue(out, self.clock())
                ds.incoming = max(0, ds.incoming - 1)
                ds.incoming_kv_bytes = max(0.0, ds.incoming_kv_bytes - out.kv_bytes)
                return
            ds.running = max(0, ds.running - 1)
            ds.kv_bytes = max(0.0, ds.kv_bytes - out.kv_bytes)
            if tokens:
                keys = block_keys(self.view.fingerprint, tokens, self.view.block_size)
                # published by the decode worker: into its node's store (one store: the prefill's view)
                holder = out.placement.decode if self.view.nodes else out.placement.prefill
                if keys:
                    self.view.cache_insert(holder, keys, len(keys) * self.view.block_size)

    # -- hot-block replication -------------------------------------------------------------------
    def _count_fetches(self, placement: Placement, keys: list[int], cached_tokens: int) -> None:
        """Cross-node fetches of this request, to the replication policy (under the lock)."""
        if self.replication is None or not self.view.nodes:
            return
        node_of = self.view.node_of
        fetched = []
        if placement.fetch_from is not None and cached_tokens >= self.block_size:
            fetched.append((placement.fetch_from, keys[:cached_tokens // self.block_size]))
        if keys and node_of(placement.prefill) != node_of(placement.decode):
            fetched.append((node_of(placement.prefill), keys))
        targets = list(dict.fromkeys(node_of(p) for p in self.all_prefill))  # drained ones too: they come back
        for source, run in fetched:
            self.replications += self.replication.fetched(source, list(run), targets, self._holds)

    def _holds(self, holder: str, keys) -> int:
        return self.view.locator.prefix_blocks(list(keys), [holder])[holder]

    def take_replications(self) -> list[Replicate]:
        with self.lock:
            out, self.replications = self.replications, []
            return out

    def replicated(self, order: Replicate, keys: list[int], tokens: int) -> None:
        """A copy landed: ``keys`` (``tokens`` tokens) are in ``order.target``'s store now."""
        with self.lock:
            if keys and order.target in self.view.caches:
                self.view.cache_insert(order.target, keys, tokens)
                self.replicated_blocks += len(keys)

    def observe_load(self, name: str, load: dict) -> None:
        """A worker's load report (the supervisor's ping): its observed speed corrects the model's for it."""
        if self.correction is None:
            return
        with self.lock:
            now = self.clock()
            ds = self.view.decode_state.get(name)
            seeded = self.correction.seeded  # a worker's timing at start counts once per start: predict it once
            if name in self.view.prefill_state and load.get("warm_up") and not seeded("prefill", name):
                timed = load["warm_up"]
                self.correction.seed("prefill", name, sum(s for _, s in timed),
                                     sum(self.cost.prefill_time(n) for n, _ in timed))
            if ds is not None and load.get("warm_up_step") and not seeded("decode", name):  # (context, s)
                tokens, seconds = load["warm_up_step"]
                self.correction.seed("decode", name, float(seconds),
                                     self.cost.decode_step_time(1, self.cost.kv_bytes(tokens)))
            if ds is not None and load.get("running") and load.get("mean_step_s"):
                predicted = self.cost.decode_step_time(int(load["running"]), ds.kv_bytes)
                self.correction.decode_step(name, float(load["mean_step_s"]), predicted, now)
            self._correct(*(r for r, states in (("prefill", self.view.prefill_state),
                                                ("decode", self.view.decode_state)) if name in states))

    def _correct(self, *roles: str) -> None:
        """The slowdown of every worker of ``roles`` (default all) from the correction's sums, under the lock:
        a worker's own figure moves its peers' fallback too. ``transfer``: a prefill worker's fetches from
        another node's store."""
        for role in roles or ("prefill", "decode", "transfer"):
            states = self.view.decode_state if role == "decode" else self.view.prefill_state
            attr = "transfer_slowdown" if role == "transfer" else "slowdown"
            for name, factor in self.correction.slowdowns(role, states, self.clock()).items():
                setattr(states[name], attr, factor)

    def slowdowns(self) -> dict[str, float]:
        """Each worker's observed over predicted time (1.0: as the cost model says, or not yet observed)."""
        with self.lock:
            return {**{n: s.slowdown for n, s in self.view.prefill_state.items()},
                    **{n: s.slowdown for n, s in self.view.decode_state.items()}}

    def transfer_slowdowns(self) -> dict[str, float]:
        """Each prefill worker's observed over predicted time of fetching a prefix from another node's store."""
        with self.lock:
            return {n: s.transfer_slowdown for n, s in self.view.prefill_state.items()}

    def update_loads(self, loads: dict[str, dict]) -> None:
        with self.lock:
            self.view.load = dict(loads)
            for name, load in loads.items():
                ds = self.view.decode_state.get(name)
                if ds is not None and "running" in load:
                    ds.running = int(load["running"]) + int(load.get("waiting", 0))

    def apply_events(self, events) -> None:
        """The store's events: a removed block leaves every worker's index (with its extensions),
        unless the same batch stores it again (a fuller copy replacing it)."""
        with self.lock:
            last = {(e.node, e.key): e.kind for e in events}
            for e in events:
                at = (e.node, e.key)
                if e.kind == "removed" and last[at] == "stored":  # replaced by a fuller copy: still held
                    continue
                if e.kind == "stored":
                    (self.on_disk.add if e.tier == "disk" else self.on_disk.discard)(at)
                    continue
                if e.tier == "host" and at in self.on_disk:  # demoted, still cached
                    continue
                self.on_disk.discard(at)
                # one store per node: its node's cache; the only store: every worker's view of it
                holders = [e.node] if self.view.nodes and e.node in self.view.caches else list(self.view.caches)
                for h in holders:
                    cache = self.view.caches[h]
                    if e.key in cache:
                        _drop_subtree(cache, e.key)

    def stats(self) -> dict:
        with self.lock:
            return {"policy": getattr(self.policy, "name", type(self.policy).__name__),
                    "requests": self.requests, "rejected": self.rejected,
                    "predicted_hit_tokens": self.predicted_hit_tokens,
                    "delivered_hit_tokens": self.delivered_hit_tokens,
                    "delivered_partial_tokens": self.delivered_partial_tokens, "in_flight": len(self.outstanding),
                    "remote_hit_tokens": self.remote_hit_tokens, "replicated_blocks": self.replicated_blocks,
                    "ttft_observed_over_predicted": (statistics.median(o / p for o, p in self.ttfts)
                                                     if self.ttfts else 0.0)}


def _drop_subtree(index, key: int) -> None:
    for child in list(index.entries[key].children):
        _drop_subtree(index, child)
    index.remove(key)
