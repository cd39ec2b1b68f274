"""``goodput``: our policy. Mooncake's placement (global cache-aware, fetch of hot prefixes,
decode chosen by predicted TBT), plus admission that maximises *goodput* (requests per second
that meet both SLOs) instead of admitting everything that can still squeak under the TTFT SLO.

Why: once the prefill pool is the bottleneck, every admitted request spends prefill seconds
that other requests then wait behind. Mooncake admits any request whose predicted TTFT fits
the SLO, so under overload its queues sit near the SLO and a single 100k-token prompt can take
the place of dozens of short ones. Here a request is admitted only if its own prefill cost fits
a share of the slack left before the SLO:

    prefill_cost <= share * (ttft_slo - queue)

applied only once the pool is backed up (mean queue > ``free_backlog`` x the TTFT SLO, 9 s at
30 s): below that, shedding costs requests that would have met the SLO (at 0.1 x SLO it lost
0.6% of goodput at 1x speed on the conversation trace), so the pool admits what Mooncake
would. As the queue fills, only ever cheaper work is admitted, so the pool's seconds go to the
requests that buy the most completions (a smooth shortest-job-first admission). Cache hits make a request cheaper, so
conversation turns whose history is cached are kept. The TBT check keeps ``tbt_headroom`` of
the SLO in reserve, because a batch admitted at the SLO's edge misses it as sequences join and
their KV grows.
"""
from __future__ import annotations

from scheduler.cost_model import CostModel
from scheduler.mooncake import MooncakePolicy
from scheduler.placement import Reject
from scheduler.policies import SLO


class GoodputPolicy(MooncakePolicy):
    name = "goodput"
    rejects = True

    def __init__(self, cost: CostModel, slo: SLO = SLO(), seed: int = 0, reject: bool | None = None,
                 balance_threshold: float = 1.25, share: float = 0.25, tbt_headroom: float = 0.9,
                 free_backlog: float = 0.3):
        super().__init__(cost, slo, seed, reject, balance_threshold)
        if not 0.0 < share <= 1.0 or not 0.0 < tbt_headroom <= 1.0:
            raise ValueError(f"share and tbt_headroom must be in (0, 1], got {share}, {tbt_headroom}")
        self.share, self.tbt_headroom, self.free_backlog = share, tbt_headroom, free_backlog

    def choose(self, request, view):
        placement = super().choose(request, view)
        if not self.reject:
            return placement
        ttft_slo, tbt_slo = self.slos(request)
        queue = view.prefill_state[placement.prefill].queue_s(view.now)
        cost = placement.predicted_ttft_s - queue
        backlog = sum(view.prefill_state[p].queue_s(view.now) for p in view.prefill) / len(view.prefill)
        if backlog > self.free_backlog * ttft_slo and cost > self.share * (ttft_slo - queue):
            return Reject(f"goodput admission: prefill {cost:.2f}s > {self.share} x slack {ttft_slo - queue:.2f}s",
                          retry_after_s=queue - (ttft_slo - cost / self.share))  # when the slack would fit it
        if placement.predicted_tbt_s > self.tbt_headroom * tbt_slo:
            return Reject(f"predicted TBT {placement.predicted_tbt_s * 1e3:.0f}ms leaves no headroom under "
                          f"{tbt_slo * 1e3:.0f}ms")
        return placement
