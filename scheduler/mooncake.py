"""Mooncake's Conductor policy (FAST'25, Algorithm 1), with the arXiv report's prediction-based
early rejection.

For every prefill instance, TTFT = queue + prefill, where the prefill may start from the
instance's own cached prefix or, when another instance holds a prefix longer than
``balance_threshold`` times the local one, from that prefix after fetching it (transfer time
added; on a cluster of Ray nodes the source is the node holding that prefix). Fetching copies the hot blocks to the chosen instance: replication follows demand.
The instance with the lowest TTFT wins; the decode instance is the one with the lowest
predicted TBT at the time the request will get there (its load then, not now). A request is
rejected early when its predicted TTFT or TBT misses its SLO.
"""
from __future__ import annotations

from scheduler.cost_model import CostModel
from scheduler.placement import ClusterView, Placement, PlacementRequest
from scheduler.policies import SLO, Policy


class MooncakePolicy(Policy):
    name = "mooncake"
    rejects = True

    def __init__(self, cost: CostModel, slo: SLO = SLO(), seed: int = 0, reject: bool | None = None,
                 balance_threshold: float = 1.25):
        super().__init__(cost, slo, seed, reject)
        if balance_threshold < 1.0:
            raise ValueError(f"balance_threshold must be >= 1, got {balance_threshold}")
        self.balance_threshold = balance_threshold

    def best_prefill(self, request: PlacementRequest, view: ClusterView) -> tuple[str, float, int, str | None]:
        """(instance, predicted TTFT, cached tokens it will use, instance to fetch the prefix from)."""
        prefix = view.prefix_tokens(request)
        best_p = max(view.prefill, key=lambda n: (prefix[n], n))
        best_len = prefix[best_p]
        choice = None
        source, nodes = view.node_of(best_p), view.nodes
        for p in view.prefill:
            local = prefix[p]
            if nodes.get(p, p) != source and best_len > self.balance_threshold * local:
                option = (self.ttft(view, p, request, best_len, fetched=best_len - local), p, best_len, source)
            else:
                option = (self.ttft(view, p, request, local), p, local, None)
            if choice is None or option[:2] < choice[:2]:
                choice = option
        ttft, p, cached, source = choice
        return p, ttft, cached, source

    def choose(self, request, view):
        p, ttft, cached, source = self.best_prefill(request, view)
        d, tbt = self.pick_decode(view, p, request, ttft)
        return Placement(p, d, cached, source, ttft, tbt)
