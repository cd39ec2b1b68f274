"""The live Conductor corrects its cost model by each worker's observed speed (scheduler.correction), and keeps
its predicted queues honest when a request ends before its prefill is reported."""
from types import SimpleNamespace

import pytest

from scheduler.conductor import Conductor
from scheduler.correction import CostCorrection
from scheduler.cost_model import CostModel
from scheduler.placement import Placement, PlacementRequest, Reject
from scheduler.policies import SLO, make_policy

BS = 16
# 1 ms per prompt token, decode steps of 10 ms + 1 ms per sequence
COST = CostModel("unit", prefill_overhead_s=0.0, prefill_s_per_token=1e-3, prefill_s_per_pair=0.0,
                 decode_overhead_s=0.01, decode_weights_s=0.0, decode_s_per_seq=1e-3, decode_s_per_kv_byte=0.0,
                 kv_bytes_global_per_token=100.0, kv_bytes_local_per_token=0.0, net_bytes_per_s=1e9)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def conductor(policy="mooncake", slo=SLO(ttft_s=2.0, tbt_s=1.0), correct=True, clock=None):
    return Conductor(make_policy(policy, COST, slo), COST, ["p0"], ["d0"], BS, 0, clock=clock or Clock(),
                     correct=correct)


def req(rid, n=1000, ttft_slo_s=None):
    start = 3 + sum(map(ord, rid)) * 7 % 1000
    return PlacementRequest(rid, n, ttft_slo_s=ttft_slo_s, prompt=tuple(range(start, start + n)))


def test_the_ratio_waits_for_enough_observations_is_bounded_and_follows_a_change():
    c = CostCorrection(half_life_s=10.0, min_seen=3, lo=0.1, hi=20.0)
    for i in range(2):
        c.prefilled("p", 5.0, 1.0, now=3.0)
        assert c.slowdown("prefill", "p") == 1.0  # two prompts: not yet
    c.prefilled("p", 5.0, 1.0, now=3.0)
    assert c.slowdown("prefill", "p") == pytest.approx(5.0)
    c.prefilled("p", 0.0, 1.0, now=3.0)  # done in the step the prompt before paid for: its model time still counts
    assert c.slowdown("prefill", "p") == pytest.approx(15.0 / 4.0)
    for i in range(60):  # the machine got 4x faster: the old observations fade
        c.prefilled("p", 1.0, 1.0, now=5.0 + i)
    assert c.slowdown("prefill", "p") == pytest.approx(1.0, rel=0.1)
    for i in range(5):
        c.decode_step("d", observed_s=10.0, predicted_s=0.01, now=i)
    assert c.slowdown("decode", "d") == pytest.approx(20.0)  # bounded: one odd worker cannot shut placement
    assert c.slowdown("decode", "unseen") == pytest.approx(20.0)  # a worker not yet seen takes its peers' figure


def test_a_worker_back_in_placement_starts_at_its_peers_speed():
    """decode-0 died while slow (x4); back, judged by that figure, it would lose every placement to decode-1
    (x2) and never be observed again. It starts over at its peers' figure instead."""
    c = conductor(policy="cache_aware", slo=SLO(ttft_s=60.0, tbt_s=10.0))
    c.view.decode_state["d1"] = type(c.view.decode_state["d0"])("d1")
    c.all_decode.append("d1")
    c._live()
    for _ in range(4):
        c.observe_load("d0", {"running": 1, "mean_step_s": 0.044})  # the model: 11 ms
        c.observe_load("d1", {"running": 1, "mean_step_s": 0.022})
    # each its own ratio weighed 4 : 8 against the role's figure (sqrt 8)
    assert c.slowdowns() == {"p0": 1.0, "d0": pytest.approx(32 ** (1 / 3)), "d1": pytest.approx(16 ** (1 / 3))}
    c.mark_down("d0")
    c.mark_up("d0")
    assert c.slowdowns()["d0"] == pytest.approx(2.0)
    placed = [c.place(req(f"x{i}", n=50)).decode for i in range(4)]
    assert "d0" in placed


def test_a_worker_five_times_slower_than_its_model_gets_five_times_the_predicted_ttft_and_is_rejected_early():
    clock = Clock()
    c = conductor(clock=clock)
    first = c.place(req("warm-0"))
    assert isinstance(first, Placement) and first.predicted_ttft_s == pytest.approx(1.0)  # 1000 tokens x 1 ms
    c.finished("warm-0")
    for i in range(4):  # four prompts of 1000 tokens, each taking 5 s of the engine's time (a lax SLO)
        rid = f"r{i}"
        assert isinstance(c.place(req(rid, ttft_slo_s=60.0)), Placement)
        clock.t += 5.0
        c.prefilled(rid, [], 0, 0, busy_s=5.0)
        c.finished(rid)
    assert c.slowdowns()["p0"] == pytest.approx(5.0, rel=0.05)
    got = c.place(req("late"))  # 1 s by the model, ~5 s by what p0 shows: past the 2 s SLO
    assert isinstance(got, Reject) and "predicted TTFT" in got.reason
    ok = c.place(req("short", n=200))  # 0.2 s by the model, ~1 s observed: within the SLO
    assert isinstance(ok, Placement) and ok.predicted_ttft_s == pytest.approx(1.0, rel=0.05)
    stats = c.stats()
    assert stats["ttft_observed_over_predicted"] == pytest.approx(5.0, rel=0.05)  # corrected only afterwards


def test_without_correction_the_model_stands():
    clock = Clock()
    c = conductor(correct=False, clock=clock)
    for i in range(4):
        c.place(req(f"r{i}"))
        clock.t += 5.0
        c.prefilled(f"r{i}", [], 0, 0, busy_s=5.0)
        c.finished(f"r{i}")
    assert c.slowdowns() == {"p0": 1.0, "d0": 1.0}
    assert isinstance(c.place(req("late")), Placement)


def test_decode_steps_slower_than_the_model_raise_the_predicted_tbt():
    c = conductor(slo=SLO(ttft_s=60.0, tbt_s=0.05))
    for _ in range(4):  # batch of 4: the model says 14 ms a step, the worker shows 70 ms
        c.observe_load("d0", {"running": 4, "waiting": 0, "mean_step_s": 0.07})
    assert c.slowdowns()["d0"] == pytest.approx(5.0)
    got = c.place(req("x", n=100))
    assert isinstance(got, Reject) and "predicted TBT" in got.reason


def test_a_request_that_ends_before_its_prefill_is_reported_leaves_no_queue_behind():
    """Cancelled, failed or placed again before prefill: its prefill worker's predicted queue and its decode
    worker's incoming count go back (the old code moved it out of ``running``, leaving ``incoming`` +1 forever)."""
    c = conductor(policy="cache_aware", correct=False)
    for i in range(3):
        assert isinstance(c.place(req(f"gone-{i}")), Placement)
        c.finished(f"gone-{i}")
    ps, ds = c.view.prefill_state["p0"], c.view.decode_state["d0"]
    assert (ps.queued, ds.incoming, ds.incoming_kv_bytes, ds.running) == (0, 0, 0.0, 0)
    assert ps.queue_s(c.clock()) == 0.0
    c.place(req("kept"))
    c.prefilled("kept", [], 0, 0)
    c.prefilled("kept", [], 0, 0)  # a second report changes nothing
    assert (ps.queued, ds.incoming, ds.running) == (0, 0, 1)
    c.finished("kept")
    assert (ds.incoming, ds.running) == (0, 0)


def test_the_predicted_queue_after_a_completion_is_the_work_still_placed_there():
    """Three prompts of 1 s (by the model) placed at once; when the first finishes on time, 2 s remain. The old
    update subtracted the finished prompt's second from the old busy-until and read 1 s, one second short per
    completion, so under steady load the queue looked ever shorter than it was."""
    clock = Clock()
    c = conductor(policy="cache_aware", correct=False, clock=clock)
    for i in range(3):
        c.place(req(f"q{i}"))
    ps = c.view.prefill_state["p0"]
    assert ps.queue_s(clock()) == pytest.approx(3.0)
    clock.t += 1.0
    c.prefilled("q0", [], 0, 0)
    assert ps.queue_s(clock()) == pytest.approx(2.0)
    clock.t += 1.5  # late: the second prompt took 1.5 s
    c.prefilled("q1", [], 0, 0)
    assert ps.queue_s(clock()) == pytest.approx(1.0)
    c.finished("q2")  # given up before its prefill: nothing left
    assert ps.queue_s(clock()) == 0.0


def test_the_supervisor_hands_every_workers_report_to_the_conductor():
    from pdserve.supervisor import Member, Supervisor

    seen = []
    members = [Member("p0", "prefill", None), Member("store", "store", None)]
    sup = Supervisor(members, lambda n: None, lambda m: True, lambda n: None, on_report=lambda n, l: seen.append((n, l)))
    sup._answered(members[0], {"incarnation": "a", "busy_total_s": 3.5, "ready": True})
    sup._answered(members[1], {"incarnation": "s"})
    assert seen == [("p0", {"busy_total_s": 3.5})]


def test_status_metrics_and_pdserve_status_show_the_correction(capsys, monkeypatch):
    import pdserve.server_cli as cli
    from pdserve.gateway import status_message
    from pdserve.metrics import Metrics

    s = {"cost_model": "cpu-fallback", "ttft_observed_over_predicted": 3.2,
         "workers": {"prefill-0": {"role": "prefill", "slowdown": 4.9}, "decode-0": {"role": "decode", "running": 1, "waiting": 0,
                                                                                  "slowdown": 1.25}}}
    status = status_message("skv-tiny", s)
    assert [w.slowdown for w in status.workers] == [4.9, 1.25] and status.cost_model == "cpu-fallback"
    monkeypatch.setattr(cli, "_client", lambda args: SimpleNamespace(status=lambda: status))
    assert cli._status(SimpleNamespace()) == 0
    out = capsys.readouterr().out
    assert "cost model cpu-fallback, observed / predicted time: prefill-0 4.90, decode-0 1.25; TTFT 3.20" in out
    assert "fetches from other nodes" not in out  # one node: nothing crosses
    for name, w in s["workers"].items():
        w["node"] = "a" if name == "prefill-0" else "b"
    s["workers"]["prefill-0"]["transfer_slowdown"] = 12.5
    status = status_message("skv-tiny", s)
    assert cli._status(SimpleNamespace()) == 0
    assert "fetches from other nodes, observed / predicted time: prefill-0 12.50\n" in capsys.readouterr().out
    m = Metrics("skv-tiny")
    m.update_cluster(s)
    value = m.registry.get_sample_value
    assert value("pdserve:worker_slowdown", {"model_name": "skv-tiny", "worker": "prefill-0"}) == 4.9
    assert value("pdserve:worker_transfer_slowdown", {"model_name": "skv-tiny", "worker": "prefill-0"}) == 12.5
    assert value("pdserve:worker_transfer_slowdown", {"model_name": "skv-tiny", "worker": "decode-0"}) is None
    assert value("pdserve:ttft_observed_over_predicted", {"model_name": "skv-tiny"}) == 3.2
    from pdserve.dashboard import Dashboard

    door = SimpleNamespace(limits=SimpleNamespace(model="skv-tiny"), serving=True, live={},
                           metrics=SimpleNamespace(recent=SimpleNamespace(percentiles=lambda: {})))
    shaped = Dashboard(door).shape(s)["workers"]
    assert [(w["slowdown"], w["transfer_slowdown"]) for w in shaped] == [(4.9, 12.5), (1.25, 1.0)]


def test_a_prefill_workers_timing_at_start_seeds_its_figure_at_once():
    """Before any prompt finishes, the workers' timed warm-up prompts set the figure (requests arriving in the
    first seconds were placed on the model's figure alone)."""
    c = conductor(correct=True)
    c.observe_load("p0", {"warm_up": [[128, 0.512], [512, 2.048]]})  # the model: 0.128 + 0.512
    assert c.slowdowns()["p0"] == pytest.approx(4.0)
    c.observe_load("p0", {"warm_up": [[128, 6.4], [512, 25.6]]})  # seeds once per worker
    assert c.slowdowns()["p0"] == pytest.approx(4.0)
    got = c.place(req("first"))
    assert isinstance(got, Reject) and "predicted TTFT 4.00s" in got.reason  # 1 s by the model: past the 2 s SLO


def test_a_prefill_worker_times_its_warm_up_leaves_its_engine_clean_and_hands_off_each_prompts_busy_time():
    """The warm-up counts nowhere; then each handoff carries the busy seconds since the previous prompt, so the
    Conductor pairs a prompt's observed time with its own prediction (a load report's cumulative count, set against
    the prompts reported done by then, was off by whichever prompt was half-way between the two)."""
    from kvstore.blocks import BlockSpec
    from kvstore.index import KVLayout
    from kvstore.keys import fingerprint_of
    from kvstore.store import KVStore
    from model.engine import EngineConfig, SamplingParams
    from model.loader import build, random_state
    from model.presets import get_preset
    from prefill.worker import WARM_UP_TOKENS, PrefillWorker

    cfg = get_preset("skv-tiny")
    model = build(cfg, random_state(cfg, 0))
    store = KVStore(BlockSpec.of(cfg), fingerprint_of(model), KVLayout.of(cfg))
    worker = PrefillWorker("p", model, store, fingerprint_of(model), EngineConfig(kv_cache_bytes=16 * 2**20))
    timed = worker.load()["warm_up"]
    assert [n for n, _ in timed] == list(WARM_UP_TOKENS) and all(s > 0 for _, s in timed)
    assert worker.engine.pool.free_counts() == worker.engine.pool.capacity and not worker.engine.sequences
    assert worker.load()["busy_total_s"] == 0.0 and store.stats.bytes_in == 0  # nothing published
    one = SamplingParams(max_tokens=1)
    first = worker.prefill("r1", list(range(10, 90)), one)
    assert 0 < first.busy_s <= worker.load()["busy_total_s"]
    second = worker.prefill("r2", list(range(10, 90)) + [7, 8], one)  # the first's 80 tokens cached
    busy = worker.load()["busy_total_s"]
    assert second.cached_tokens == 80 and 0 < second.busy_s <= busy - first.busy_s
    assert first.busy_s + second.busy_s == pytest.approx(busy, rel=0.2)  # all but the tail of the last step


def test_a_decode_worker_times_its_warm_up_and_it_seeds_the_conductor():
    from kvstore.blocks import BlockSpec
    from kvstore.index import KVLayout
    from kvstore.keys import fingerprint_of
    from kvstore.store import KVStore
    from decode.worker import DecodeWorker
    from model.engine import EngineConfig
    from model.loader import build, random_state
    from model.presets import get_preset

    cfg = get_preset("skv-tiny")
    model = build(cfg, random_state(cfg, 0))
    store = KVStore(BlockSpec.of(cfg), fingerprint_of(model), KVLayout.of(cfg))
    worker = DecodeWorker("d", model, store, fingerprint_of(model), EngineConfig(kv_cache_bytes=16 * 2**20))
    try:
        load = worker.load()
        assert load["warm_up_step"][0] == 16 and load["warm_up_step"][1] > 0
        assert load["running"] == 0 and not worker.engine.sequences
        assert worker.engine.pool.free_counts() == worker.engine.pool.capacity and worker.step_times == []
    finally:
        worker.shutdown()
    c = conductor()
    c.observe_load("d0", {"running": 0, "warm_up_step": (16, 0.033)})  # the model: 10 ms + 1 ms for one sequence
    assert c.slowdowns()["d0"] == pytest.approx(3.0)


def test_timings_at_start_set_one_figure_for_the_role_and_a_burst_spreads_over_identical_workers():
    """Two identical decode workers timed their warm-up steps while every worker started at once on two cores:
    19 ms and 8 ms (measured here). Kept per worker, the seeds sent a burst of eight streams all to the
    "faster" one; pooled, both stand at the geometric mean until their own steps tell them apart."""
    c = conductor(policy="cache_aware", slo=SLO(ttft_s=60.0, tbt_s=10.0))
    c.view.decode_state["d1"] = type(c.view.decode_state["d0"])("d1")
    c.all_decode.append("d1")
    c._live()
    c.observe_load("d0", {"running": 0, "warm_up_step": (16, 0.019)})  # the model: 11 ms for one sequence
    c.observe_load("d1", {"running": 0, "warm_up_step": (16, 0.008)})
    pooled = (0.019 * 0.008) ** 0.5 / 0.011
    assert c.slowdowns()["d0"] == pytest.approx(pooled) and c.slowdowns()["d1"] == pytest.approx(pooled)
    placed = [c.place(req(f"x{i}", n=50)).decode for i in range(8)]
    assert placed.count("d0") == placed.count("d1") == 4
    c.mark_down("d0")
    c.mark_up("d0")  # restarted: its old timing no longer counts, its next report brings a new one
    assert c.slowdowns()["d0"] == pytest.approx(0.008 / 0.011)
    c.observe_load("d0", {"running": 0, "warm_up_step": (16, 0.019)})
    assert c.slowdowns()["d0"] == pytest.approx(pooled)
    for _ in range(3):  # real steps under load: d0 is the slower one after all
        c.observe_load("d0", {"running": 4, "mean_step_s": 0.028})  # the model: 14 ms at batch 4
        c.observe_load("d1", {"running": 4, "mean_step_s": 0.014})
    # 3 observations each, weighed against the role's 8 (the geometric mean of 2 and 1)
    assert c.slowdowns()["d0"] == pytest.approx(2 ** (7 / 11)) and c.slowdowns()["d1"] == pytest.approx(2 ** (4 / 11))


def test_a_few_noisy_prompts_do_not_tell_identical_workers_apart_and_a_real_difference_shows():
    """Identical prefill workers of skv-tiny on two shared cores took 8 to 20 ms for the same prompt. Three prompts
    each, at 2x and 1x the model: judged by their own ratios alone they read 2x apart, past the 1.8x a 64-token hit
    on a 93-token prompt is worth, and the next turn of a conversation left the worker that held its KV."""
    c = CostCorrection(half_life_s=1e9, min_seen=3)
    for _ in range(3):
        c.prefilled("p0", 0.020, 0.010, now=0.0)
        c.prefilled("p1", 0.010, 0.010, now=0.0)
    few = c.slowdowns("prefill", ["p0", "p1"])
    assert few["p0"] / few["p1"] == pytest.approx(2 ** (3 / 11))  # 1.21x
    for _ in range(45):  # a difference that lasts is a difference of the workers
        c.prefilled("p0", 0.020, 0.010, now=0.0)
        c.prefilled("p1", 0.010, 0.010, now=0.0)
    many = c.slowdowns("prefill", ["p0", "p1"])
    assert many["p0"] / many["p1"] == pytest.approx(2 ** (48 / 56)) and many["p0"] / many["p1"] > 1.8


def test_a_figure_no_longer_refreshed_drifts_back_toward_the_roles_and_the_worker_is_tried_again():
    """d0 read 4x slower than d1 over 48 reports each; then it had nothing to run for ten minutes while d1 kept
    reporting. Judged by its old figure at full weight it would be chosen only as a last resort; its evidence
    fades like its sums (half-life 60 s), so its figure returns to the role's (the geometric mean of the two) and
    placement tries it sooner."""
    def cluster():
        clock = Clock()
        c = conductor(policy="cache_aware", slo=SLO(ttft_s=60.0, tbt_s=10.0), clock=clock)
        c.view.decode_state["d1"] = type(c.view.decode_state["d0"])("d1")
        c.all_decode.append("d1")
        c._live()
        for i in range(48):
            clock.t = float(i)
            c.observe_load("d0", {"running": 1, "mean_step_s": 0.044})  # the model: 11 ms
            c.observe_load("d1", {"running": 1, "mean_step_s": 0.011})
        return c, clock

    fresh, _ = cluster()
    stale, clock = cluster()
    for i in range(600):  # d1 keeps reporting, d0 has nothing to run
        clock.t = 48.0 + i
        stale.observe_load("d0", {"running": 0})
        stale.observe_load("d1", {"running": 1, "mean_step_s": 0.011})
    was, now = fresh.slowdowns(), stale.slowdowns()
    assert was["d0"] / was["d1"] > 3.0
    assert now["d1"] < was["d1"] < 1.2  # still observed: its own figure (1) holds, and weighs more
    assert now["d0"] == pytest.approx(2.0, rel=0.02)  # the role's figure, sqrt(4 x 1)
    to_d0 = [sum(c.place(req(f"r{i}", n=50)).decode == "d0" for i in range(24)) for c in (fresh, stale)]
    assert to_d0[1] > to_d0[0], to_d0
