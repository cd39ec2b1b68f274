"""Through a local Ray cluster (1 prefill + 1 decode, skv-tiny int8): a decode step longer than the
supervisor's ``unresponsive_s`` (1 s) keeps the worker in placement and the cluster serving (its ping
answers beside the step); a step longer than ``stall_timeout_s`` makes it ``stuck`` until the step ends,
and its request still ends with the tokens it gets alone; a stuck prefill worker loses its request to a new
placement, and the lease of the call given up goes back; a request id in flight is refused."""
import threading
import time

import pytest

from alone import skv_tiny_alone
from model.config import QuantConfig
from model.engine import SamplingParams
from pdserve.config import Resilience
from test_resilience_cluster import settled

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
STALL_S = 4.0


@pytest.fixture(scope="module")
def cluster():
    from pdserve.cluster import LocalCluster

    with LocalCluster("skv-tiny", quant=QuantConfig(), num_cpus=2,
                      resilience=Resilience(stall_timeout_s=STALL_S, recovery_timeout_s=60.0)) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    with skv_tiny_alone(PARAMS) as run:
        yield run


def run_watched(cluster, prompt: list[int], worker: str = "decode-0") -> tuple[list[int], set[tuple[str, bool]]]:
    """The request's tokens, and every (``worker``'s state, cluster serving) seen while it ran."""
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.add((cluster.supervisor.snapshot()[worker]["state"], cluster.serving()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        sub = cluster.submit(prompt, PARAMS)
        tokens = [t for out in cluster.stream(sub) for t in out.token_ids]
    finally:
        done.set()
        watcher.join(5)
    return tokens, seen


def test_a_long_step_is_not_a_lost_worker(cluster, reference):
    prompt = list(range(5, 105))
    cluster.arm_fault("decode-0", "decode.step", "delay", after=2, seconds=2.5)  # 2.5 s > unresponsive_s, < stall
    before = cluster.counters.snapshot()["migrations"]
    tokens, seen = run_watched(cluster, prompt)
    assert tokens == reference(prompt)
    assert seen == {("alive", True)}, f"the decode worker left placement during a long step: {seen}"
    assert cluster.counters.snapshot()["migrations"] == before
    settled(cluster)


def test_a_step_longer_than_the_stall_timeout_is_stuck_then_back(cluster, reference):
    prompt = list(range(9, 109))
    cluster.arm_fault("decode-0", "decode.step", "delay", after=2, seconds=STALL_S + 3)
    tokens, seen = run_watched(cluster, prompt)
    assert tokens == reference(prompt)  # (moved when its stream went silent; resumed when the step ended)
    assert ("stuck", False) in seen, f"never stuck: {seen}"
    deadline = time.monotonic() + 30
    while cluster.supervisor.snapshot()["decode-0"]["state"] != "alive":
        assert time.monotonic() < deadline, "the worker never came back after its step"
        time.sleep(0.1)
    s = settled(cluster)
    d = s["workers"]["decode-0"]
    assert d["restarts"] == 0 and s["store"]["live_leases"] == 0 and d["free_blocks"] == d["capacity"]


def test_a_stuck_prefill_loses_its_request_to_a_new_placement(cluster, reference):
    prompt = list(range(13, 113))
    cluster.arm_fault("prefill-0", "prefill.step", "delay", seconds=STALL_S + 3)
    before = cluster.counters.snapshot()["replacements"]
    tokens, seen = run_watched(cluster, prompt, "prefill-0")
    assert tokens == reference(prompt)
    assert ("stuck", False) in seen and cluster.counters.snapshot()["replacements"] == before + 1
    s = settled(cluster)  # the abandoned call's lease was given back when it ended
    assert s["store"]["live_leases"] == 0 and s["workers"]["prefill-0"]["restarts"] == 0


def test_a_request_id_in_flight_is_refused(cluster, reference):
    from pdserve.errors import ServeError

    prompt = list(range(21, 121))
    first = cluster.submit(prompt, PARAMS, request_id="same")
    with pytest.raises(ServeError, match="request_id: 'same' is in flight") as refused:
        cluster.submit(list(range(30, 60)), PARAMS, request_id="same")
    assert refused.value.code == "ALREADY_EXISTS"
    assert [t for out in cluster.stream(first) for t in out.token_ids] == reference(prompt)
    again = cluster.submit(prompt, PARAMS, request_id="same")  # once it is done, the id is free again
    assert [t for out in cluster.stream(again) for t in out.token_ids] == reference(prompt)
