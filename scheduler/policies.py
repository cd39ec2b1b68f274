"""Placement policies behind one interface (design invariant 6): ``place(request, view) -> Placement | Reject``.

The live Conductor and the simulator call these very objects. Each predicts with a ``CostModel``:

    TTFT(p) = queue(p) + [transfer of a fetched prefix x transfer_slowdown(p)]
              + prefill(new tokens, cached tokens) x slowdown(p)
    TBT(d)  = decode step time of d's batch with this request added (at the time it arrives there) x slowdown(d)

(``slowdown``: the live Conductor's observed-over-predicted time of each worker, ``scheduler.correction``;
always 1 in the simulator.)

- ``random`` / ``round_robin``: baselines that ignore state.
- ``least_loaded``: the shortest prefill queue and the lightest decode batch (load balancing).
- ``cache_aware``: the prefill instance with the lowest TTFT using its *own* cached prefix
  (Mooncake's "local cache-aware"): the longest prefix wins unless its queue costs more. With
  ``remote_fetch`` on (a cluster of several Ray nodes turns it on) it also weighs fetching the
  longest prefix any node holds from that node against recomputing it (``fetch_from`` names the node).
- ``mooncake``: FAST'25 Algorithm 1 (see ``scheduler.mooncake``).
- ``goodput``: ours (see ``scheduler.goodput``).
"""
from __future__ import annotations

import random as _random
from dataclasses import dataclass

from scheduler.cost_model import CostModel
from scheduler.placement import ClusterView, Placement, PlacementRequest, Reject, RoundRobinSticky


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 30.0
    tbt_s: float = 0.1


class Policy:
    """Shared machinery: predictions, decode choice, sticky sessions, SLO checks."""

    name = "base"
    rejects = False

    def __init__(self, cost: CostModel, slo: SLO = SLO(), seed: int = 0, reject: bool | None = None):
        self.cost, self.slo = cost, slo
        self.rng = _random.Random(seed)
        self.reject = self.rejects if reject is None else reject
        self.sessions: dict[str, str] = {}  # session id -> prefill instance that holds its KV

    # -- predictions -----------------------------------------------------------------------------
    def ttft(self, view: ClusterView, p: str, request: PlacementRequest, cached: int, fetched: int = 0) -> float:
        n = request.prompt_tokens
        cached = min(cached, n - 1) if n > 0 else 0
        ps = view.prefill_state[p]
        t = ps.queue_s(view.now) + self.cost.prefill_time(n - cached, cached) * ps.slowdown
        if fetched > 0:
            t += self.cost.transfer_time(self.cost.kv_bytes(fetched)) * ps.transfer_slowdown
        return t

    def tbt(self, view: ClusterView, d: str, request: PlacementRequest, after_s: float = 0.0) -> float:
        """Step time of ``d`` once this request joins, ``after_s`` from now (the predicted load then:
        sequences on their way in join, recently observed finish rates leave)."""
        s = view.decode_state[d]
        leaving = min(s.running, s.finish_rate * after_s)
        batch = s.running + s.incoming + 1 - leaving
        per_seq = s.kv_bytes / s.running if s.running else 0.0
        kv = s.kv_bytes - leaving * per_seq + s.incoming_kv_bytes + self.cost.kv_bytes(request.prompt_tokens)
        return self.cost.decode_step_time(max(1, round(batch)), max(0.0, kv)) * s.slowdown

    def pick_decode(self, view: ClusterView, p: str, request: PlacementRequest, after_s: float) -> tuple[str, float]:
        if view.colocated:
            return p, self.tbt(view, p, request, after_s)
        return min(((d, self.tbt(view, d, request, after_s)) for d in view.decode), key=lambda x: (x[1], x[0]))

    def slos(self, request: PlacementRequest) -> tuple[float, float]:
        return request.ttft_slo_s or self.slo.ttft_s, request.tbt_slo_s or self.slo.tbt_s

    def check(self, request: PlacementRequest, placement: Placement) -> Placement | Reject:
        """Early rejection: refuse what is predicted to miss its SLO (when this policy rejects)."""
        if not self.reject:
            return placement
        ttft_slo, tbt_slo = self.slos(request)
        if placement.predicted_ttft_s is not None and placement.predicted_ttft_s > ttft_slo:
            return Reject(f"predicted TTFT {placement.predicted_ttft_s:.2f}s > SLO {ttft_slo:.2f}s",
                          retry_after_s=placement.predicted_ttft_s - ttft_slo)  # the queue ahead, drained that much
        if placement.predicted_tbt_s is not None and placement.predicted_tbt_s > tbt_slo:
            return Reject(f"predicted TBT {placement.predicted_tbt_s * 1e3:.0f}ms > SLO {tbt_slo * 1e3:.0f}ms")
        return placement

    def place(self, request: PlacementRequest, view: ClusterView) -> Placement | Reject:
        if not view.prefill or not view.decode:
            return Reject("no prefill or no decode worker is up")
        placement = self.sticky(request, view)
        if placement is None:
            placement = self.choose(request, view)
        if isinstance(placement, Placement) and request.session_id:
            self.sessions[request.session_id] = placement.prefill
        return placement if isinstance(placement, Reject) else self.check(request, placement)

    def sticky(self, request: PlacementRequest, view: ClusterView) -> Placement | None:
        """A session stays where its KV is, unless that breaks its TTFT SLO."""
        p = self.sessions.get(request.session_id) if request.session_id else None
        if p is None or p not in view.prefill:
            return None
        cached = view.prefix_tokens(request).get(p, 0)
        ttft = self.ttft(view, p, request, cached)
        if ttft > self.slos(request)[0]:
            return None
        d, tbt = self.pick_decode(view, p, request, ttft)
        return Placement(p, d, cached, None, ttft, tbt)

    def choose(self, request: PlacementRequest, view: ClusterView) -> Placement | Reject:
        raise NotImplementedError


class RandomPolicy(Policy):
    name = "random"

    def choose(self, request, view):
        p = self.rng.choice(view.prefill)
        d = p if view.colocated else self.rng.choice(view.decode)
        cached = view.prefix_tokens(request)[p]
        return Placement(p, d, cached, None, self.ttft(view, p, request, cached), self.tbt(view, d, request))


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, cost: CostModel, slo: SLO = SLO(), seed: int = 0, reject: bool | None = None):
        super().__init__(cost, slo, seed, reject)
        self.rr = RoundRobinSticky()

    def choose(self, request, view):
        got = self.rr.place(request, view)
        if isinstance(got, Reject):
            return got
        cached = view.prefix_tokens(request)[got.prefill]
        return Placement(got.prefill, got.prefill if view.colocated else got.decode, cached, None,
                         self.ttft(view, got.prefill, request, cached), self.tbt(view, got.decode, request))


class LeastLoadedPolicy(Policy):
    """Load balancing: the shortest prefill queue, then the decode instance with the fastest step."""

    name = "least_loaded"

    def choose(self, request, view):
        p = min(view.prefill, key=lambda n: (view.prefill_state[n].queue_s(view.now), view.prefill_state[n].queued, n))
        cached = view.prefix_tokens(request)[p]
        ttft = self.ttft(view, p, request, cached)
        d, tbt = self.pick_decode(view, p, request, ttft)
        return Placement(p, d, cached, None, ttft, tbt)


class CacheAwarePolicy(Policy):
    """Local cache-aware: the lowest predicted TTFT with each instance's own cached prefix."""

    name = "cache_aware"
    remote_fetch = False  # also weigh fetching another holder's longer prefix (multi-node clusters)

    def choose(self, request, view):
        prefix = view.prefix_tokens(request)
        options = [(self.ttft(view, n, request, prefix[n]), n, prefix[n], None) for n in view.prefill]
        if self.remote_fetch:
            source, best = view.best_holder(request)
            options += [(self.ttft(view, n, request, best, fetched=best - prefix[n]), n, best, source)
                        for n in view.prefill if source is not None and best > prefix[n]
                        and view.node_of(n) != source]
        ttft, p, cached, source = min(options, key=lambda x: (x[0], x[1], x[3] is not None))
        d, tbt = self.pick_decode(view, p, request, ttft)
        return Placement(p, d, cached, source, ttft, tbt)


def policy_names() -> tuple[str, ...]:
    return tuple(_registry())


def _registry() -> dict[str, type[Policy]]:
    from scheduler.goodput import GoodputPolicy
    from scheduler.mooncake import MooncakePolicy

    return {c.name: c for c in (RandomPolicy, RoundRobinPolicy, LeastLoadedPolicy, CacheAwarePolicy,
                                MooncakePolicy, GoodputPolicy)}


def make_policy(name: str, cost: CostModel, slo: SLO = SLO(), seed: int = 0, **options) -> Policy:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(registry)}")
    return registry[name](cost, slo, seed, **options)
