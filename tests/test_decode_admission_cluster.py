"""Through a local Ray cluster whose decode pool holds two of these requests at a time: handoffs that
find it full wait in the decode worker instead of failing (decode/worker.py), every request ends with
the tokens it gets alone, and killing the decode worker while handoffs wait loses none of them."""
import os
import signal
import threading
import time

import pytest

from alone import skv_tiny_alone
from model.config import QuantConfig
from model.engine import Engine, EngineConfig, SamplingParams
from model.loader import load
from pdserve.config import Resilience
from test_resilience_cluster import settled

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)
SMALL_POOL = EngineConfig(num_blocks=24, max_seqs=8)  # 24 blocks of 16 tokens a group: two of these at once


@pytest.fixture(scope="module")
def cluster():
    from pdserve.cluster import LocalCluster

    with LocalCluster("skv-tiny", quant=QuantConfig(), num_cpus=2, engine_config=SMALL_POOL,
                      resilience=Resilience(stall_timeout_s=15.0, recovery_timeout_s=60.0)) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    with skv_tiny_alone(PARAMS) as run:
        yield run


def prompts(seed: int, n: int = 8) -> list[list[int]]:
    return [[(seed + 7 * i + j) % 400 + 3 for j in range(150)] for i in range(n)]


def run_all(cluster, ps, during=None) -> list[list[int]]:
    subs = [cluster.submit(p, PARAMS) for p in ps]  # all in flight together
    if during is not None:
        during()
    return [[t for out in cluster.stream(sub) for t in out.token_ids] for sub in subs]


def test_handoffs_wait_for_a_full_decode_pool(cluster, reference):
    ps = prompts(0)
    got = run_all(cluster, ps)
    for p, tokens in zip(ps, got):
        assert tokens == reference(p)
    s = settled(cluster)
    d = s["workers"]["decode-0"]
    assert s["store"]["live_leases"] == 0 and d["free_blocks"] == d["capacity"] and d["waiting"] == 0


def test_decode_killed_while_handoffs_wait(cluster, reference):
    ps = prompts(100)
    victim = cluster.ray.get(cluster.actor("decode-0").pid.remote(), timeout=30)

    def kill_once_some_wait():
        deadline = time.monotonic() + 60
        while cluster.status()["workers"]["decode-0"].get("waiting", 0) < 1:
            assert time.monotonic() < deadline, "no handoff ever waited for the decode pool"
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)

    got = run_all(cluster, ps, kill_once_some_wait)
    for p, tokens in zip(ps, got):
        assert tokens == reference(p)
    s = settled(cluster)
    d = s["workers"]["decode-0"]
    assert d["restarts"] >= 1 and s["store"]["live_leases"] == 0 and d["free_blocks"] == d["capacity"]


@pytest.fixture(scope="module")
def short_stall_cluster():
    """A decode pool for one of these requests at a time and a 1.5 s stall clock."""
    from pdserve.cluster import LocalCluster

    one_at_a_time = EngineConfig(num_blocks=16, max_seqs=8)
    with LocalCluster("skv-tiny", quant=QuantConfig(), num_cpus=2, engine_config=one_at_a_time,
                      resilience=Resilience(stall_timeout_s=1.5, recovery_timeout_s=60.0)) as c:
        yield c


def test_a_handoff_queued_longer_than_the_stall_clock_is_not_taken_for_a_lost_worker(short_stall_cluster):
    """Two requests, room for one: the second waits for the whole of the first (its steps slowed to
    outlast the 1.5 s stall clock). Its stream is silent that long but the worker is stepping: keep-alives
    must keep the driver from moving it (a move re-prefills it and counts the worker as suspect)."""
    cluster, ref = short_stall_cluster, load("skv-tiny", quant=QuantConfig()).model
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    ps = prompts(200, n=2)
    cluster.arm_fault("decode-0", "decode.step", "delay", times=60, seconds=0.06)
    subs = [cluster.submit(p, params) for p in ps]
    got, gaps = {}, {}

    def read(i):  # each stream on its own thread, so that a gap is the stream's own
        tokens, last, gaps[i] = [], None, 0.0
        for out in cluster.stream(subs[i]):  # (the first output comes at once: the token prefill made)
            tokens += out.token_ids
            now = time.monotonic()
            gaps[i], last = max(gaps[i], now - (last or now)), now
        got[i] = tokens

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(ps))]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=120)
    alone = Engine(ref, EngineConfig(kv_cache_bytes=64 * 2**20, max_seqs=1))
    for i, p in enumerate(ps):
        assert got[i] == alone.generate([p], params)[0]
    s = cluster.status()
    assert max(gaps.values()) > 1.5, gaps  # one request did wait longer than the stall clock
    assert s["counters"]["migrations"] == 0 and s["workers"]["decode-0"]["restarts"] == 0
