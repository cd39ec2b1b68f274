"""The trace simulator: conservation, determinism, cache reuse, colocated baseline, the CLI, and the
paper's TTFT ordering on the Mooncake conversation trace (skipped when the trace is absent)."""
import json
import random
from pathlib import Path

import pytest

from kvstore.keys import trace_block_keys
from pdserve.cli import main
from scheduler.cost_model import preset
from scheduler.policies import SLO
from scheduler.sim_run import load_requests, simulate
from scheduler.simulator import SimConfig, SimRequest

COST = preset("llama3-70b-a800")
POLICIES = ("random", "round_robin", "least_loaded", "cache_aware", "mooncake", "goodput")


def conversations(n_conv=40, turns=4, seed=1, gap_s=0.5) -> list[SimRequest]:
    """Multi-turn conversations: each turn's prompt extends the previous one (shared hash ids)."""
    rng = random.Random(seed)
    out, next_id, t = [], 0, 0.0
    for c in range(n_conv):
        ids, start = [], t
        for turn in range(turns):
            new = rng.randint(2, 12)
            ids = ids + list(range(next_id, next_id + new))
            next_id += new
            n = len(ids) * 512 - rng.randint(0, 400)
            out.append(SimRequest(start + turn * 20.0, n, rng.randint(20, 400), tuple(trace_block_keys(ids)), f"c{c}"))
        t += rng.expovariate(1 / gap_s)
    return sorted(out, key=lambda r: r.arrival)


@pytest.mark.parametrize("colocated", (False, True))
@pytest.mark.parametrize("speed", (1.0, 8.0))
def test_every_request_is_either_completed_or_rejected(colocated, speed):
    reqs = conversations()
    for name in POLICIES:
        out = simulate(reqs, name, COST, SimConfig(2, 2, 512, 200_000, speed, colocated))
        assert out["completed"] + out["rejected"] == out["requests"] == len(reqs), name
        assert out["completed"] > 0
        assert 0 <= out["slo_attainment"] <= 1 and out["ttft_p50"] <= out["ttft_p99"]
        assert out["delivered_hit_tokens"] <= sum(r.input_tokens for r in reqs)


def test_the_simulator_is_deterministic_under_a_seed():
    reqs = conversations()
    cfg = SimConfig(3, 2, 512, 100_000, 4.0)
    strip = lambda o: {k: v for k, v in o.items() if not k.startswith("decision_us")}
    a, b = (strip(simulate(reqs, "random", COST, cfg, seed=7)) for _ in range(2))
    assert a == b
    assert strip(simulate(reqs, "random", COST, cfg, seed=8)) != a  # the seed is really used


def test_later_turns_hit_the_cache_and_cache_awareness_pays():
    import dataclasses

    reqs = [dataclasses.replace(r, session_id=None) for r in conversations()]  # no stickiness to lean on
    cfg = SimConfig(4, 2, 512, None, 4.0)
    aware = simulate(reqs, "cache_aware", COST, cfg)
    rand = simulate(reqs, "random", COST, cfg, seed=3)
    assert aware["cache_hit_ratio"] > 0.4  # turns 2-4 reuse most of their prompt
    assert aware["cache_hit_ratio"] > rand["cache_hit_ratio"] + 0.2
    assert aware["ttft_mean"] < rand["ttft_mean"]
    assert aware["predicted_hit_tokens"] == aware["delivered_hit_tokens"]  # unbounded cache: nothing evicted
    assert aware["prefill_busy_seconds"] < rand["prefill_busy_seconds"]
    sticky = simulate(conversations(), "random", COST, cfg, seed=3)  # sessions keep random placement local
    assert sticky["cache_hit_ratio"] > rand["cache_hit_ratio"] + 0.2


def test_colocation_stretches_token_gaps():
    reqs = conversations()
    dis = simulate(reqs, "cache_aware", COST, SimConfig(2, 2, 512, None, 2.0))
    col = simulate(reqs, "cache_aware", COST, SimConfig(2, 2, 512, None, 2.0, colocated=True))
    assert col["tbt_p99"] > 2 * dis["tbt_p99"]


def test_a_tbt_of_the_slowest_tenth_of_gaps():
    from scheduler.sim_instance import Record

    rec = Record(0, 0.0, 10, 21, gaps=[[0.02, 18.0], [0.5, 2.0]])
    assert rec.tbt() == pytest.approx(0.5)  # 20 gaps: the slowest 2
    rec.join_wait = 1.0
    assert rec.tbt() == pytest.approx((1.02 + 0.5) / 2)


def test_token_level_trace_and_cli_sweep(tmp_path, capsys):
    trace = tmp_path / "tokens.jsonl"
    rng = random.Random(0)
    with open(trace, "w") as f:
        for conv in range(12):
            history = [rng.randrange(100, 5000) for _ in range(300)]
            for turn in range(3):
                history = history + [rng.randrange(100, 5000) for _ in range(80)]
                f.write(json.dumps({"timestamp": (conv * 300 + turn * 4000), "tokens": history,
                                    "output_length": 50, "session_id": f"s{conv}"}) + "\n")
    reqs, bs = load_requests(trace, 64)
    assert bs == 64 and len(reqs) == 36 and reqs[1].keys[:4] == reqs[0].keys[:4]
    out_json, plots = tmp_path / "r.json", tmp_path / "plots"
    rc = main(["sim", "--trace", str(trace), "--policy", "cache_aware,goodput", "--prefill", "2", "--decode", "1",
               "--cost-model", "cai-13b-skv-h100", "--sweep", "--speeds", "1,4", "--json", str(out_json),
               "--plot", str(plots)])
    assert rc == 0
    results = json.loads(out_json.read_text())
    assert len(results) == 4 and {r["policy"] for r in results} == {"cache_aware", "goodput"}
    assert all(r["completed"] + r["rejected"] == 36 for r in results)
    for key in ("requests", "completed", "rejected", "ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99", "tbt_mean",
                "tbt_p99", "slo_attainment", "goodput_rps", "cache_hit_ratio", "prefill_busy_seconds"):
        assert key in results[0]
    assert results[0]["cache_hit_ratio"] > 0.5
    assert (plots / "goodput_rps.png").stat().st_size > 1000 and (plots / "ttft_mean.png").is_file()
    assert "goodput" in capsys.readouterr().out


def test_cli_names_the_bad_flag(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0, 1]}) + "\n")
    assert main(["sim", "--trace", str(trace), "--policy", "fifo"]) == 2
    assert "--policy: unknown policy 'fifo'; valid policies: random" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    assert main(["sim", "--trace", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "conversation_trace.jsonl"


@pytest.mark.skipif(not TRACE.is_file(), reason="the shared Mooncake trace is not beside this checkout")
def test_mean_ttft_ordering_on_the_conversation_trace_matches_the_paper():
    reqs, bs = load_requests(TRACE)
    cfg = SimConfig(8, 8, bs, 2_000_000, 1.0)
    ttft = {p: simulate(reqs, p, COST, cfg, SLO(30.0, 0.1))["ttft_mean"]
            for p in ("random", "least_loaded", "cache_aware", "mooncake")}
    assert ttft["random"] > ttft["least_loaded"] > ttft["cache_aware"] > ttft["mooncake"], ttft
