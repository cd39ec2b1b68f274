"""2 prefill + 2 decode workers (skv-tiny, default int8): killing one decode worker moves its
streams to the other, live one at once (not after the restart), new requests are served
meanwhile, and the restarted worker rejoins placement. (The issue's report: every stream of the
dead worker failed, and so did every new request for 60 s although the other worker was alive.)
A prefill worker dying mid-prefill and the store killed mid-run, with 8 requests in flight over
both pairs, end the same way: fault-free tokens, nothing held, service within a bound."""
import os
import signal
import time

import pytest

from alone import skv_tiny_alone
from model.config import QuantConfig
from model.engine import Engine, EngineConfig, SamplingParams
from model.loader import load
from pdserve.config import Resilience
from streams import stream_all

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)
# Streams that must still be decoding when their worker is killed: at 24 tokens a stream on the faster CPU path
# finished before the kill once (its request then had nothing to migrate, and the test failed on migrations == 0).
IN_FLIGHT = SamplingParams(max_tokens=160, ignore_eos=True)
RECOVERY_S = 60  # bound on a worker's restart and first answer on this (slow, shared) machine


@pytest.fixture(scope="module")
def cluster():
    from pdserve.cluster import LocalCluster

    with LocalCluster("skv-tiny", quant=QuantConfig(), n_prefill=2, n_decode=2, num_cpus=2,
                      resilience=Resilience(stall_timeout_s=15.0, recovery_timeout_s=60.0)) as c:
        yield c


def test_a_dead_decode_worker_hands_its_streams_to_the_live_one(cluster):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference shares two busy cores with four workers
    try:
        engine = Engine(load("skv-tiny", quant=QuantConfig()).model, EngineConfig(kv_cache_bytes=64 * 2**20, max_seqs=1))
        prompts = [list(range(20 + 5 * i, 45 + 6 * i)) for i in range(8)]
        expected = [engine.generate([p], IN_FLIGHT)[0] for p in prompts]
    finally:
        torch.set_num_threads(threads)
    subs = [cluster.submit(p, IN_FLIGHT) for p in prompts]
    streams = [cluster.stream(s) for s in subs]
    try:
        got = [list(next(st).token_ids) for st in streams]
        on = {s.request_id: s.placement.decode for s in subs}
        assert set(on.values()) == {"decode-0", "decode-1"}  # both hold streams
        victim = cluster.ray.get(cluster.actor("decode-0").pid.remote(), timeout=30)
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        while "decode-0" in cluster.conductor.view.decode:  # out of placement within about a second
            assert time.monotonic() - t0 < 3.0
            time.sleep(0.02)
        assert cluster.serving()  # decode-1 and both prefill workers are alive
        # new requests are served while decode-0 restarts, on decode-1
        extra = cluster.submit(list(range(100, 130)), PARAMS)
        extra_tokens = [t for out in cluster.stream(extra) for t in out.token_ids]
        assert extra.placement.decode == "decode-1" and len(extra_tokens) == PARAMS.max_tokens
        for g, st in zip(got, streams):
            for out in st:
                g.extend(out.token_ids)
        assert got == expected
        moved = [s for s in subs if on[s.request_id] == "decode-0"]
        assert moved and all(s.migrations >= 1 for s in moved)
        assert cluster.counters.migrations >= len(moved)
        deadline = t0 + 60
        while cluster.supervisor.snapshot()["decode-0"]["state"] != "alive":
            assert time.monotonic() < deadline, "decode-0 did not come back"
            time.sleep(0.1)
        assert cluster.status()["workers"]["decode-0"]["restarts"] == 1
        later = [cluster.submit(list(range(200 + i, 220 + i)), PARAMS) for i in range(6)]
        assert "decode-0" in {s.placement.decode for s in later}  # back in placement
        for s in later:
            assert len([t for out in cluster.stream(s) for t in out.token_ids]) == PARAMS.max_tokens
    finally:  # a failure here must not leave eight streams in flight for the tests after it
        for sub, st in zip(subs, streams):
            cluster.cancel(sub.request_id)
            st.close()


@pytest.fixture(scope="module")
def reference():
    with skv_tiny_alone(PARAMS) as run:
        yield run


def assert_settled_and_serving(cluster, reference, since: float) -> None:
    """Nothing leased, held or in flight on any worker; a new request served within RECOVERY_S of the fault."""
    deadline = time.monotonic() + 30
    while True:
        s = cluster.status()
        decodes = [s["workers"][n] for n in ("decode-0", "decode-1")]
        idle = all(d.get("running") == 0 and d.get("free_blocks") == d.get("capacity") for d in decodes)
        if (idle and s["store"].get("live_leases") == 0 and s["in_flight"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle and s["store"]["live_leases"] == 0 and s["in_flight"] == 0, s
    p = list(range(400, 431))
    tokens, last, _ = cluster.generate(p, PARAMS)
    assert last.finished and tokens == reference(p)
    assert time.monotonic() - since < RECOVERY_S


def test_a_prefill_worker_dying_mid_prefill_loses_nothing(cluster, reference):
    ps = [list(range(60 + 7 * i, 100 + 9 * i)) for i in range(8)]
    before = cluster.status()["counters"]["replacements"]
    cluster.arm_fault("prefill-0", "prefill.compute", "exit", after=0)  # its first prefill
    t0 = time.monotonic()
    subs = [cluster.submit(p, PARAMS) for p in ps]
    assert stream_all(cluster, subs) == [reference(p) for p in ps]
    assert cluster.status()["counters"]["replacements"] >= before + 1
    assert_settled_and_serving(cluster, reference, t0)


def test_the_store_killed_mid_run_loses_nothing(cluster, reference):
    ps = [list(range(150 + 5 * i, 190 + 8 * i)) for i in range(8)]
    victim = cluster.ray.get(cluster.actor("store").pid.remote(), timeout=30)
    resets, t0 = cluster.counters.store_resets, []
    got = stream_all(cluster, [cluster.submit(p, PARAMS) for p in ps],
                   on_first=lambda: (os.kill(victim, signal.SIGKILL), t0.append(time.monotonic())))
    assert got == [reference(p) for p in ps]
    deadline = time.monotonic() + RECOVERY_S
    while cluster.counters.store_resets == resets and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.counters.store_resets == resets + 1  # the Conductor forgot the lost blocks
    assert_settled_and_serving(cluster, reference, t0[0])
