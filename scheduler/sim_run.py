"""Traces in, metrics out: what ``pdserve sim`` and the benchmark run around the simulator.

Two trace formats, one ``SimRequest`` list:
- Mooncake (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids`` of 512-token
  blocks): keys chain the hash ids (``kvstore.keys.trace_block_keys``).
- token-level (``timestamp`` ms, ``tokens`` (ids), ``output_length``, optional ``session_id``):
  keys chain the token ids (``kvstore.keys.block_keys``) with ``block_size`` tokens a block.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from kvstore.keys import block_keys, trace_block_keys
from kvstore.trace import TRACE_BLOCK
from scheduler.cost_model import CostModel
from scheduler.policies import SLO, make_policy
from scheduler.simulator import SimConfig, SimRequest, Simulator

TBT_SLOS_MS = (100, 200, 300)


def load_requests(path: str | Path, block_size: int = 64) -> tuple[list[SimRequest], int]:
    """The requests of a trace file and the block size their keys use."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    out, bs = [], None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                arrival = float(r.get("timestamp", 0)) / 1000.0
                if "hash_ids" in r:
                    bs = TRACE_BLOCK
                    out.append(SimRequest(arrival, int(r["input_length"]), int(r.get("output_length", 1)),
                                          tuple(trace_block_keys(r["hash_ids"])), r.get("session_id")))
                else:
                    bs = block_size
                    toks = [int(t) for t in r["tokens"]]
                    out.append(SimRequest(arrival, len(toks), int(r.get("output_length", 1)),
                                          tuple(block_keys(0, toks, block_size)), r.get("session_id")))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: neither a Mooncake nor a token-level trace line ({e})") from e
    return out, bs or block_size


def simulate(requests: list[SimRequest], policy: str, cost: CostModel, config: SimConfig,
             slo: SLO = SLO(), seed: int = 0, **policy_options) -> dict:
    pol = make_policy(policy, cost, slo, seed, **policy_options)
    if config.n_nodes:  # caches per node: a prefix on another node may be fetched (as on a live cluster)
        pol.remote_fetch = True
    sim = Simulator(requests, pol, cost, config)
    records = sim.run()
    out = summarize(records, slo, config.speed, requests)
    busy = sum(i.busy_s for i in sim.inst.values())
    lat = sorted(sim.decision_s)
    out.update(policy=policy, prefill_busy_seconds=busy,
               decision_us_mean=1e6 * sum(lat) / max(1, len(lat)), decision_us_p99=1e6 * _pct(lat, 99),
               n_prefill=config.n_prefill, n_decode=config.n_decode, colocated=config.colocated, n_nodes=config.n_nodes,
               speed=config.speed, cost_model=cost.name)
    return out


def summarize(records, slo: SLO, speed: float, requests: list[SimRequest]) -> dict:
    n = len(records)
    done = [r for r in records if not r.rejected]
    assert all(r.done is not None for r in done), "a request was neither rejected nor completed"
    ttft = sorted(r.ttft for r in done)
    tbts = [r.tbt() for r in done]
    tbt_known = sorted(t for t in tbts if t is not None)
    span = (max(r.arrival for r in requests) - min(r.arrival for r in requests)) / speed if requests else 0.0
    span = span or 1.0

    def good(tbt_slo_s: float) -> int:
        return sum(1 for r, b in zip(done, tbts) if r.ttft <= slo.ttft_s and (b is None or b <= tbt_slo_s))

    hit = sum(r.delivered_hit for r in done)
    tokens = sum(r.input_tokens for r in done)
    out = {
        "requests": n, "completed": len(done), "rejected": n - len(done),
        "ttft_mean": _mean(ttft), "ttft_p50": _pct(ttft, 50), "ttft_p90": _pct(ttft, 90), "ttft_p99": _pct(ttft, 99),
        "tbt_mean": _mean(tbt_known), "tbt_p99": _pct(tbt_known, 99),
        "slo_attainment": good(slo.tbt_s) / n if n else 0.0, "goodput_rps": good(slo.tbt_s) / span,
        "cache_hit_ratio": hit / tokens if tokens else 0.0,
        "predicted_hit_tokens": sum(r.predicted_hit for r in done), "delivered_hit_tokens": hit,
        "ttft_slo_s": slo.ttft_s, "tbt_slo_s": slo.tbt_s, "duration_s": span,
    }
    for ms in TBT_SLOS_MS:
        out[f"slo_attainment_tbt{ms}"] = good(ms / 1e3) / n if n else 0.0
        out[f"goodput_rps_tbt{ms}"] = good(ms / 1e3) / span
    return out


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _pct(sorted_xs, q: float) -> float:
    if not sorted_xs:
        return 0.0
    i = min(len(sorted_xs) - 1, max(0, math.ceil(q / 100 * len(sorted_xs)) - 1))
    return float(sorted_xs[i])
