"""The live Conductor's correction of its cost model, from what the workers report.

A cost model is a fit (``pdserve calibrate``, of the engine alone in one process) or a guess
(``CPU_FALLBACK``), and live workers run under conditions no fit saw: one torch thread each, neighbours on
the same cores, another GPU. On a 2-core CPU the fallback predicted SmolLM2's prefills ~7-8x too fast, so
a policy that rejects early (``mooncake``, ``goodput``) admitted requests that then waited far past their
TTFT SLO. Here each worker's observed over predicted time becomes its ``slowdown``, by which the policies
scale that worker's predictions (its queue, TTFT and TBT), so early rejection and the choice between
workers rest on the speed the cluster has. The simulator never corrects: there the model is the truth.

- prefill: the engine's busy seconds (a cumulative count in each load report) over the model's time for
  the prompts the worker finished meanwhile (new and cached tokens as delivered);
- decode: the worker's mean step time over the model's step time at its reported batch.

Both are ratios of sums decayed with a half-life of ``half_life_s``, so they follow a machine whose speed
changes; the ratio stays within [``lo``, ``hi``] so that one odd report cannot shut placement. A worker with
fewer than ``min_seen`` observations of its own (new, restarted, back from a stuck step: ``forget``) takes the
geometric mean of its peers' ratios: the same hardware, most likely, and a worker judged by a stale figure
could lose every placement to its peers and never be observed again.

Before any worker of a role has its own ratio, the timings the workers took at start (``seed``) set one figure
for the whole role, the geometric mean of their ratios: without them, every request that arrived before three
prompts finished was placed on the model's figure alone. They are pooled, not kept per worker, because they
are taken while every worker starts at once: on a 2-core CPU two identical decode workers timed 19 ms and 8 ms,
and a per-worker seed sent a burst of eight streams all to the "faster" one. Real observations under load tell
workers apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Sums:
    observed: float = 0.0
    predicted: float = 0.0
    seen: int = 0  # observations so far
    at: float | None = None  # when last decayed
    busy_total: float | None = None  # a prefill worker's cumulative busy seconds at its last report


class CostCorrection:
    def __init__(self, half_life_s: float = 60.0, min_seen: int = 3, lo: float = 0.05, hi: float = 50.0):
        self.half_life_s, self.min_seen, self.lo, self.hi = half_life_s, min_seen, lo, hi
        self.sums: dict[tuple[str, str], _Sums] = {}
        self.seeds: dict[tuple[str, str], float] = {}  # (role, worker) -> its ratio timed at start

    def _at(self, role: str, worker: str, now: float) -> _Sums:
        s = self.sums.setdefault((role, worker), _Sums())
        if s.at is not None and now > s.at:
            f = 0.5 ** ((now - s.at) / self.half_life_s)
            s.observed, s.predicted = s.observed * f, s.predicted * f
        s.at = now if s.at is None else max(s.at, now)
        return s

    def prefilled(self, worker: str, predicted_s: float, now: float) -> None:
        """A prompt of ``worker`` is done; the model gave it ``predicted_s``."""
        s = self._at("prefill", worker, now)
        s.predicted += predicted_s
        s.seen += 1

    def prefill_busy(self, worker: str, busy_total_s: float, now: float) -> None:
        """A load report: the engine's busy seconds since the worker started (a restart counts from 0 again)."""
        s = self._at("prefill", worker, now)
        if s.busy_total is not None and busy_total_s >= s.busy_total:
            s.observed += busy_total_s - s.busy_total
        s.busy_total = busy_total_s

    def decode_step(self, worker: str, observed_s: float, predicted_s: float, now: float) -> None:
        """A load report of a decode worker with a batch: its mean step time, and the model's for that batch."""
        if observed_s > 0 and predicted_s > 0:
            s = self._at("decode", worker, now)
            s.observed += observed_s
            s.predicted += predicted_s
            s.seen += 1

    def seed(self, role: str, worker: str, observed_s: float, predicted_s: float) -> None:
        """A worker's timing at start (once per start): with its peers', the role's figure until one has its own."""
        if (role, worker) not in self.seeds and observed_s > 0 and predicted_s > 0:
            self.seeds[(role, worker)] = min(self.hi, max(self.lo, observed_s / predicted_s))

    def forget(self, role: str, worker: str) -> None:
        """``worker`` starts over (restarted, or back in placement after a stuck step): at its peers' ratio until
        it has its own; a restart's new timing replaces its old one."""
        self.sums.pop((role, worker), None)
        self.seeds.pop((role, worker), None)

    def _own(self, role: str, worker: str) -> float | None:
        s = self.sums.get((role, worker))
        if s is None or s.seen < self.min_seen or s.predicted <= 0 or s.observed <= 0:
            return None
        return min(self.hi, max(self.lo, s.observed / s.predicted))

    def slowdowns(self, role: str, workers) -> dict[str, float]:
        """Each of ``workers``' ratio: its own, else the geometric mean of every worker of ``role`` that has
        one, else that of the role's timings at start, else 1 (nothing seen yet)."""
        seen = [r for (ro, w) in self.sums if ro == role and (r := self._own(ro, w)) is not None]
        seen = seen or [r for (ro, _), r in self.seeds.items() if ro == role]
        peers = math.exp(sum(map(math.log, seen)) / len(seen)) if seen else 1.0
        return {w: peers if (r := self._own(role, w)) is None else r for w in workers}

    def slowdown(self, role: str, worker: str) -> float:
        return self.slowdowns(role, [worker])[worker]
