"""Every policy on hand-built cluster views: cache locality, queue-vs-cache trade-off, early rejection."""
import time

import pytest

from kvstore.keys import block_keys
from scheduler.cost_model import CostModel, load_cost_model, preset
from scheduler.placement import ClusterView, Placement, PlacementRequest, Reject
from scheduler.policies import SLO, make_policy, policy_names

BS = 64
# a simple cost model: 1 ms per prefilled token, 10 ms decode steps + 1 ms per sequence
COST = CostModel("unit", prefill_overhead_s=0.0, prefill_s_per_token=1e-3, prefill_s_per_pair=0.0,
                 decode_overhead_s=0.01, decode_weights_s=0.0, decode_s_per_seq=1e-3, decode_s_per_kv_byte=0.0,
                 kv_bytes_global_per_token=100.0, kv_bytes_local_per_token=0.0, net_bytes_per_s=1e9)
CACHE_POLICIES = ("cache_aware", "mooncake", "goodput")
PROMPT = list(range(1000, 1000 + 20 * BS))


def view_with(cached: dict[str, int], queue_s: dict[str, float] | None = None, n: int = 3) -> ClusterView:
    """``cached``: prefill instance -> tokens of PROMPT it holds."""
    view = ClusterView([f"p{i}" for i in range(n)], ["d0", "d1"], block_size=BS)
    for name, tokens in cached.items():
        view.cache_insert(name, block_keys(0, PROMPT[:tokens], BS), tokens)
    for name, q in (queue_s or {}).items():
        view.prefill_state[name].busy_until = view.now + q
    return view


def request(tokens=PROMPT, **kw) -> PlacementRequest:
    return PlacementRequest("r", len(tokens), prompt=tuple(tokens), **kw)


@pytest.mark.parametrize("name", CACHE_POLICIES)
def test_longest_prefix_wins_when_idle(name):
    view = view_with({"p0": 4 * BS, "p1": 16 * BS, "p2": 8 * BS})
    got = make_policy(name, COST).place(request(), view)
    assert isinstance(got, Placement) and got.prefill == "p1"
    assert got.predicted_hit_tokens == 16 * BS
    assert got.predicted_ttft_s == pytest.approx(COST.prefill_time(4 * BS, 16 * BS))


@pytest.mark.parametrize("name", CACHE_POLICIES)
def test_a_loaded_instance_loses_when_its_queue_pushes_ttft_past_another(name):
    # p1 holds 16 blocks but 5 s of queue; p2 holds 8 and is idle: 768 ms vs 5.256 s
    view = view_with({"p1": 16 * BS, "p2": 8 * BS}, {"p1": 5.0, "p0": 9.0})
    got = make_policy(name, COST).place(request(), view)
    assert got.prefill == "p2"
    # a short queue does not outweigh the longer prefix (mooncake may instead fetch it elsewhere)
    view = view_with({"p1": 16 * BS, "p2": 8 * BS}, {"p1": 0.2})
    got = make_policy(name, COST).place(request(), view)
    assert got.predicted_hit_tokens == 16 * BS and (got.prefill == "p1" or got.fetch_from == "p1")


def test_mooncake_fetches_a_much_longer_prefix_from_a_busy_instance():
    view = view_with({"p1": 16 * BS, "p2": 2 * BS}, {"p1": 50.0})
    got = make_policy("mooncake", COST, SLO(ttft_s=100)).place(request(), view)
    assert got.fetch_from == "p1" and got.prefill != "p1" and got.predicted_hit_tokens == 16 * BS
    local = make_policy("cache_aware", COST, SLO(ttft_s=100)).place(request(), view)
    assert local.fetch_from is None and local.predicted_ttft_s > got.predicted_ttft_s


@pytest.mark.parametrize("name", ("mooncake", "goodput"))
def test_rejects_when_every_placement_misses_the_ttft_slo(name):
    view = view_with({}, {"p0": 29.0, "p1": 29.5, "p2": 30.0})  # 1.28 s of prefill after >= 29 s of queue
    got = make_policy(name, COST).place(request(), view)
    assert isinstance(got, Reject) and ("TTFT" in got.reason or "admission" in got.reason)
    # its retry-after: mooncake, the 0.28 s past the SLO; goodput, until a quarter of the slack holds its 1.28 s
    assert got.retry_after_s == pytest.approx(0.28 if name == "mooncake" else 29.0 - (30.0 - 1.28 / 0.25))
    wait = got.retry_after_s + 1e-3  # the queues that much shorter: admitted
    later = view_with({}, {"p0": 29.0 - wait, "p1": 29.5 - wait, "p2": 30.0 - wait})
    assert isinstance(make_policy(name, COST).place(request(), later), Placement)
    view = view_with({}, {"p0": 29.0, "p1": 29.5, "p2": 27.0})  # p2 fits: 28.28 s
    assert isinstance(make_policy("mooncake", COST).place(request(), view), Placement)


@pytest.mark.parametrize("name", ("mooncake", "goodput"))
def test_rejects_when_every_decode_instance_misses_the_tbt_slo(name):
    view = view_with({})
    for d in view.decode:
        view.decode_state[d].running = 95  # 10 ms + 96 x 1 ms = 106 ms > 100 ms
    got = make_policy(name, COST).place(request(), view)
    assert isinstance(got, Reject) and "TBT" in got.reason
    view.decode_state["d1"].running = 50
    got = make_policy(name, COST).place(request(), view)
    assert isinstance(got, Placement) and got.decode == "d1"


def test_baselines_never_reject_and_least_loaded_takes_the_shortest_queue():
    view = view_with({"p0": 16 * BS}, {"p0": 100.0, "p1": 3.0, "p2": 1.0})
    for name in ("random", "round_robin", "least_loaded"):
        assert isinstance(make_policy(name, COST).place(request(), view), Placement)
    assert make_policy("least_loaded", COST).place(request(), view).prefill == "p2"


def test_goodput_sheds_expensive_requests_only_when_backed_up():
    big = list(range(50_000, 50_000 + 200 * BS))  # 12.8 s of prefill
    pol = make_policy("goodput", COST)
    assert isinstance(pol.place(request(big), view_with({})), Placement)  # idle: admitted
    backed_up = view_with({}, {"p0": 12.0, "p1": 12.0, "p2": 12.0})  # fits the SLO (24.8 s) but costs 12.8 s
    assert isinstance(make_policy("mooncake", COST).place(request(big), backed_up), Placement)
    got = pol.place(request(big), backed_up)
    assert isinstance(got, Reject) and "admission" in got.reason
    assert isinstance(pol.place(request(), backed_up), Placement)  # a cheap one still gets in


def test_sessions_stay_where_their_kv_is_unless_it_breaks_the_slo():
    pol = make_policy("least_loaded", COST)
    view = view_with({}, {"p0": 0.5})
    first = pol.place(request(session_id="s"), view)
    view.prefill_state[first.prefill].busy_until = 2.0  # now busier than the others, SLO still fine
    assert pol.place(request(session_id="s"), view).prefill == first.prefill
    view.prefill_state[first.prefill].busy_until = 60.0
    assert pol.place(request(session_id="s"), view).prefill != first.prefill


def test_unknown_policy_and_cost_model_name_the_valid_ones():
    with pytest.raises(ValueError, match="unknown policy 'fifo'; valid policies: random, round_robin"):
        make_policy("fifo", COST)
    with pytest.raises(ValueError, match="unknown cost model 'h200'; known: llama3-70b-a800"):
        load_cost_model("h200")
    assert set(policy_names()) >= {"random", "round_robin", "least_loaded", "cache_aware", "mooncake", "goodput"}


def test_roofline_presets_are_physically_sensible():
    llama = preset("llama3-70b-a800")
    assert llama.kv_bytes(1) == 2 * 8 * 128 * 2 * 80  # bf16 GQA-8, 80 layers: 320 KiB per token
    assert 0.5 < llama.prefill_time(8000) < 2.0  # ~141 GFLOP/token on 8 x 312 TFLOPS at 50% MFU
    assert llama.prefill_time(1000, 7000) < llama.prefill_time(8000) / 4  # cached tokens are nearly free
    skv = preset("cai-13b-skv-h100")
    # 4 global + 20 local KV groups: past the window only the global ones grow (6.2x, not 32x)
    assert skv.kv_bytes(32768) / skv.kv_bytes(1024) == pytest.approx((4 * 32768 + 20 * 1024) / (24 * 1024))
    assert CostModel.from_json(skv.to_json()) == skv


def test_the_cpu_fallback_takes_the_kv_sizes_of_the_model_it_serves():
    """Its timings are guesses; its 1,000 KV bytes per token were a twelfth of SmolLM2's int8 KV, so a 2k-token
    prefix fetched from another node took 42x its predicted transfer (3.9x with the model's KV sizes)."""
    from model.config import QuantConfig
    from model.presets import get_preset
    from scheduler.cost_model import CPU_FALLBACK, with_kv_of

    smol = get_preset("smollm2-135m").with_quant(QuantConfig())  # 30 layers, 3 KV heads of 64, all global
    cost = with_kv_of(CPU_FALLBACK, smol)
    assert cost.kv_bytes(1) == 30 * 2 * 3 * (64 + 4) == smol.kv_bytes_per_token(smol.block_size)
    assert (cost.name, cost.prefill_time(512), cost.net_bytes_per_s) == (
        CPU_FALLBACK.name, CPU_FALLBACK.prefill_time(512), CPU_FALLBACK.net_bytes_per_s)
    skv = get_preset("skv-tiny").with_quant(QuantConfig())  # sliding-window groups stop growing at the window
    long = 64 * skv.block_size
    assert with_kv_of(CPU_FALLBACK, skv).kv_bytes(long) == pytest.approx(skv.kv_bytes(long), rel=0.05)


def test_decision_latency_with_64_instances_is_under_a_millisecond():
    cost = preset("llama3-70b-a800")
    names = [f"p{i}" for i in range(64)]
    view = ClusterView(names, [f"d{i}" for i in range(64)], block_size=512)
    keys = [tuple(block_keys(0, list(range(s, s + 40 * 512)), 512)) for s in range(0, 64 * 997, 997)]
    for i, n in enumerate(names):
        view.cache_insert(n, keys[i], 40 * 512)
        view.prefill_state[n].busy_until = (i % 7) * 0.5
    for name in ("mooncake", "goodput"):
        pol = make_policy(name, cost)
        t = time.perf_counter()
        for i in range(200):
            pol.place(PlacementRequest(str(i), 40 * 512, block_keys=keys[i % 64]), view)
        per = (time.perf_counter() - t) / 200
        assert per < 1e-3, f"{name}: {per * 1e6:.0f} us per decision"


def test_calibration_fits_this_machine_and_round_trips(tmp_path):
    import numpy as np

    from scheduler.calibrate import _nonneg_lstsq, calibrate

    a = np.array([[1.0, n, n * n] for n in (1, 2, 5, 9)])
    assert _nonneg_lstsq(a, a @ np.array([0.5, 2.0, 0.1])) == pytest.approx([0.5, 2.0, 0.1])
    assert _nonneg_lstsq(a, a @ np.array([0.5, 2.0, -0.1]))[2] == 0.0  # never a negative cost
    fit = calibrate("skv-tiny", progress=False, quick=True)
    assert fit.name == "calibrated:skv-tiny" and fit.window == 24 and fit.net_bytes_per_s > 0
    assert fit.prefill_time(256) > fit.prefill_time(32) > 0  # more tokens never cost less
    assert fit.decode_step_time(4, fit.kv_bytes(128) * 4) > 0
    out = tmp_path / "fit.json"
    out.write_text(fit.to_json())
    assert load_cost_model(str(out)) == fit
    with pytest.raises(FileNotFoundError, match="pdserve calibrate --out"):
        load_cost_model(str(tmp_path / "missing.json"))
