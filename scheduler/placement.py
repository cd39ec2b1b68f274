"""The placement interface every policy implements (design invariant 6), and the minimal
policy the cluster uses until the Conductor lands: round-robin with session stickiness."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from scheduler.view import ClusterView  # noqa: F401  (re-exported: the view policies read)


@dataclass(frozen=True)
class PlacementRequest:
    request_id: str
    prompt_tokens: int
    session_id: str | None = None
    ttft_slo_s: float | None = None  # per-request SLO hints; None = the cluster's defaults
    tbt_slo_s: float | None = None
    priority: int = 0
    prompt: tuple[int, ...] = ()  # token ids, for cache-aware policies (block keys)
    block_keys: tuple[int, ...] = ()  # precomputed chained block keys (trace replay has no token ids)


@dataclass(frozen=True)
class Placement:
    prefill: str
    decode: str
    predicted_hit_tokens: int = 0
    fetch_from: str | None = None  # copy the prefix from this instance first (hot-block replication)
    predicted_ttft_s: float | None = None
    predicted_tbt_s: float | None = None


@dataclass(frozen=True)
class Reject:
    reason: str
    retry_after_s: float | None = None  # when the prediction would admit it (a queue drained); None: unknown


class RoundRobinSticky:
    """Next pair in turn; a session stays on the pair that holds its KV."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()
        self._sessions: dict[str, Placement] = {}

    def place(self, request: PlacementRequest, view: ClusterView) -> Placement | Reject:
        if not view.prefill or not view.decode:
            return Reject("no prefill or no decode worker is up")
        sticky = self._sessions.get(request.session_id) if request.session_id else None
        if sticky and sticky.prefill in view.prefill and sticky.decode in view.decode:
            return sticky
        n = next(self._turn)
        placement = Placement(view.prefill[n % len(view.prefill)], view.decode[n % len(view.decode)])
        if request.session_id:
            self._sessions[request.session_id] = placement
        return placement
