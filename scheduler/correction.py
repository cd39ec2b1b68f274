"""The live Conductor's correction of its cost model, from what the workers report.

A cost model is a fit (``pdserve calibrate``, of the engine alone in one process) or a guess
(``CPU_FALLBACK``), and live workers run under conditions no fit saw: one torch thread each, neighbours on
the same cores, another GPU. On a 2-core CPU the fallback predicted SmolLM2's prefills ~7-8x too fast, so
a policy that rejects early (``mooncake``, ``goodput``) admitted requests that then waited far past their
TTFT SLO. Here each worker's observed over predicted time becomes its ``slowdown``, by which the policies
scale that worker's predictions (its queue, TTFT and TBT), so early rejection and the choice between
workers rest on the speed the cluster has. The simulator never corrects: there the model is the truth.

- prefill: the engine's busy seconds since the worker's previous prompt, carried by each prompt's handoff,
  over the model's time for that prompt (new and cached tokens as delivered). Paired per prompt: the busy
  count of a load report, set against the prompts reported done by then, was off by whatever prompt was
  half-way between the two (a prefill-worker ratio of 0.5 where the prompts matched the model), and on two
  identical workers that was enough to move a conversation off the worker holding its KV;
- decode: the worker's mean step time over the model's step time at its reported batch;
- transfer: how long a prefill worker took to load a prefix from another node's store over the model's
  transfer time for those tokens (on two raylets of one VM a 2k-token prefix loaded in 3.9x the CPU fallback's
  time for it), so the choice between fetching a prefix and computing it again rests on the network the cluster
  has. No timing at start seeds it: until a worker has fetched, its peers' figure or the model's stands.

All three are ratios of sums decayed with a half-life of ``half_life_s``, so they follow a machine whose speed
changes; the ratio stays within [``lo``, ``hi``] so that one odd report cannot shut placement. A worker with
fewer than ``min_seen`` observations of its own (new, restarted, back from a stuck step: ``forget``) takes the
geometric mean of its peers' ratios: the same hardware, most likely, and a worker judged by a stale figure
could lose every placement to its peers and never be observed again.

A worker's own ratio counts against its role's figure by the weight of its evidence, ``n / (n + pool_weight)``
in logs, ``n`` its observations decayed like the sums (what the ratio rests on now): single prompts of a small
model on a shared 2-core CPU took 8 to 20 ms on identical workers, so three of them could tell two workers apart
by 1.8x, enough to move a conversation off the worker holding its KV; a real difference still shows, by half
after ``pool_weight`` observations and nearly whole after a few times that. Decayed, a figure that is no longer
refreshed (a worker placement has come to avoid, a decode worker with nothing to run) drifts back toward its
role's, so the worker is tried again and judged by what it does now.

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
    weight: float = 0.0  # observations so far, decayed like the sums: the evidence the ratio holds now
    at: float | None = None  # when last decayed


class CostCorrection:
    def __init__(self, half_life_s: float = 60.0, min_seen: int = 3, lo: float = 0.05, hi: float = 50.0,
                 pool_weight: float = 8.0):
        self.half_life_s, self.min_seen, self.lo, self.hi = half_life_s, min_seen, lo, hi
        self.pool_weight = pool_weight  # observations' worth of evidence the role's figure weighs against a worker's
        self.sums: dict[tuple[str, str], _Sums] = {}
        self.seeds: dict[tuple[str, str], float] = {}  # (role, worker) -> its ratio timed at start

    def _at(self, role: str, worker: str, now: float) -> _Sums:
        s = self.sums.setdefault((role, worker), _Sums())
        if s.at is not None and now > s.at:
            f = 0.5 ** ((now - s.at) / self.half_life_s)
            s.observed, s.predicted, s.weight = s.observed * f, s.predicted * f, s.weight * f
        s.at = now if s.at is None else max(s.at, now)
        return s

    def prefilled(self, worker: str, observed_s: float, predicted_s: float, now: float) -> None:
        """A prompt of ``worker`` is done: its engine was busy ``observed_s`` for it, the model gave it
        ``predicted_s``."""
        self._observe("prefill", worker, observed_s, predicted_s, now)

    def transferred(self, worker: str, observed_s: float, predicted_s: float, now: float) -> None:
        """``worker`` loaded a prefix from another node's store in ``observed_s``; the model gave the transfer
        ``predicted_s``."""
        self._observe("transfer", worker, observed_s, predicted_s, now)

    def decode_step(self, worker: str, observed_s: float, predicted_s: float, now: float) -> None:
        """A load report of a decode worker with a batch: its mean step time, and the model's for that batch."""
        self._observe("decode", worker, observed_s, predicted_s, now)

    def _observe(self, role: str, worker: str, observed_s: float, predicted_s: float, now: float) -> None:
        if observed_s >= 0 and predicted_s > 0:  # 0: a prompt done in the step its neighbour's busy_s counted
            s = self._at(role, worker, now)
            s.observed += observed_s
            s.predicted += predicted_s
            s.seen += 1
            s.weight += 1.0

    def seed(self, role: str, worker: str, observed_s: float, predicted_s: float) -> None:
        """A worker's timing at start (once per start): with its peers', the role's figure until one has its own."""
        if (role, worker) not in self.seeds and observed_s > 0 and predicted_s > 0:
            self.seeds[(role, worker)] = min(self.hi, max(self.lo, observed_s / predicted_s))

    def seeded(self, role: str, worker: str) -> bool:
        return (role, worker) in self.seeds

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

    def slowdowns(self, role: str, workers, now: float | None = None) -> dict[str, float]:
        """Each of ``workers``' ratio: the role's figure (the geometric mean of the own ratios of the role's workers
        that have one, else of the role's timings at start, else 1), moved toward the worker's own ratio, where it
        has one, by the weight of its evidence (at ``now``, where given: decayed since its last observation)."""
        own = {w: r for (ro, w) in self.sums if ro == role and (r := self._own(ro, w)) is not None}
        logs = [math.log(r) for r in own.values()] or [math.log(r) for (ro, _), r in self.seeds.items() if ro == role]
        pool = sum(logs) / len(logs) if logs else 0.0
        out = {}
        for w in workers:
            n = (self._at(role, w, now) if now is not None else self.sums[(role, w)]).weight if w in own else 0.0
            out[w] = math.exp((n * math.log(own[w]) + self.pool_weight * pool) / (n + self.pool_weight) if n else pool)
        return out

    def slowdown(self, role: str, worker: str, now: float | None = None) -> float:
        return self.slowdowns(role, [worker], now)[worker]
